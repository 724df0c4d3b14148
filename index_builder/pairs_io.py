"""Reading pair files: CSV/TSV with `image,caption` columns, or JSONL objects with those keys."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_COLUMN = "image"
CAPTION_COLUMN = "caption"
Pair = tuple[str, str]  # (image reference, caption)


class PairsFileError(ValueError):
    """The pairs file cannot be read (missing columns, bad JSON, unknown format)."""


@dataclass
class PairsFile:
    rows: list[Pair]  # in file order, captions stripped
    empty_captions: int = 0
    bad_lines: list[int] = field(default_factory=list)


def clean_caption(caption: object) -> str:
    """A caption with its whitespace collapsed ("" for None)."""
    return " ".join(str(caption or "").split())


# Why a record of a pairs file gives no pair: a blank line, a line that is not a JSON object with the image key,
# or no caption. read_pairs and the sharded reader (index_builder.sources) count them the same way.
BLANK, BAD_LINE, EMPTY_CAPTION = "blank", "bad_line", "empty_caption"


def row_pair(row: Mapping[str, object], image_col: str = IMAGE_COLUMN, caption_col: str = CAPTION_COLUMN) -> Pair | str:
    """(image reference, caption) of one row by column name, or EMPTY_CAPTION."""
    caption = clean_caption(row.get(caption_col))
    if not caption:
        return EMPTY_CAPTION
    return str(row.get(image_col) or "").strip(), caption


def json_pair(line: str, image_col: str = IMAGE_COLUMN, caption_col: str = CAPTION_COLUMN) -> Pair | str:
    """(image reference, caption) of one JSONL line, or why not: BLANK, BAD_LINE or EMPTY_CAPTION."""
    if not line.strip():
        return BLANK
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return BAD_LINE
    if not isinstance(obj, dict) or image_col not in obj:
        return BAD_LINE
    return row_pair(obj, image_col, caption_col)


def _keep(got: Pair | str, out: PairsFile, lineno: int = 0) -> None:
    if got == BAD_LINE:
        out.bad_lines.append(lineno)
    elif got == EMPTY_CAPTION:
        out.empty_captions += 1
    elif not isinstance(got, str):
        out.rows.append(got)


def read_pairs(path: str | Path) -> PairsFile:
    path = Path(path)
    if not path.is_file():
        raise PairsFileError(f"pairs file not found: {path}")
    suffix = path.suffix.lower()
    out = PairsFile(rows=[])
    if suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                _keep(json_pair(line), out, lineno)
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
            _keep(row_pair(row), out)
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
