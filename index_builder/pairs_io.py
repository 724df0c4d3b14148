"""Reading pair files: CSV/TSV with `image,caption` columns, or JSONL objects with those keys."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_COLUMN = "image"
CAPTION_COLUMN = "caption"


class PairsFileError(ValueError):
    """The pairs file cannot be read (missing columns, bad JSON, unknown format)."""


@dataclass
class PairsFile:
    rows: list[tuple[str, str]]  # (image reference, caption), in file order, captions stripped
    empty_captions: int = 0
    bad_lines: list[int] = field(default_factory=list)


def clean_caption(caption: object) -> str:
    """A caption with its whitespace collapsed ("" for None)."""
    return " ".join(str(caption or "").split())


def _keep(rows: list[tuple[str, str]], image: object, caption: object, out: PairsFile) -> None:
    image_s = str(image or "").strip()
    caption_s = clean_caption(caption)
    if not caption_s:
        out.empty_captions += 1
        return
    rows.append((image_s, caption_s))


def read_pairs(path: str | Path) -> PairsFile:
    path = Path(path)
    if not path.is_file():
        raise PairsFileError(f"pairs file not found: {path}")
    suffix = path.suffix.lower()
    out = PairsFile(rows=[])
    if suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    out.bad_lines.append(lineno)
                    continue
                if not isinstance(obj, dict) or IMAGE_COLUMN not in obj:
                    out.bad_lines.append(lineno)
                    continue
                _keep(out.rows, obj.get(IMAGE_COLUMN), obj.get(CAPTION_COLUMN), out)
        return out
    if suffix not in (".csv", ".tsv", ".txt"):
        raise PairsFileError(f"unsupported pairs file type {suffix!r}: use .csv, .tsv or .jsonl")
    delimiter = "\t" if suffix == ".tsv" else ","
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if IMAGE_COLUMN not in fields or CAPTION_COLUMN not in fields:
            raise PairsFileError(
                f"{path} must have a header with columns {IMAGE_COLUMN!r} and {CAPTION_COLUMN!r}; found {fields}"
            )
        reader.fieldnames = fields
        for row in reader:
            _keep(out.rows, row.get(IMAGE_COLUMN), row.get(CAPTION_COLUMN), out)
    return out


def resolve_image(root: Path, reference: str) -> Path | None:
    """The file an image reference names under root, or None if it escapes root (path traversal)."""
    if not reference or "\x00" in reference:
        return None
    root = root.resolve()
    candidate = (root / reference).resolve()
    if candidate != root and root in candidate.parents:
        return candidate
    return None
