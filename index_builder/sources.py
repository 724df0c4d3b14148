"""Where `asif build` reads pairs from, cut into shards that are embedded (and resumed) one at a time.

``--pairs`` names one of:

- a CSV/TSV/JSONL pairs file (``image,caption`` rows, images under ``--images-root``): cut into shards of about
  ``shard_rows`` rows at image boundaries (the rows of one image, when consecutive, stay in one shard);
- webdataset ``.tar`` shards as img2dataset writes them (``KEY.jpg``/``.png``/``.webp`` + ``KEY.txt`` [+ ``KEY.json``]),
  named by a brace pattern (``data/{00000..00127}.tar``) or a glob (``data/*.tar``): one shard per file;
- parquet files with the image bytes and the caption in columns (img2dataset: ``jpg`` and ``caption``): one shard
  per row group.

A shard is a small picklable descriptor (a file, a byte range or a row group), so shards can be sent to worker
processes or Ray actors. Reading a shard streams its samples; nothing holds all rows of a collection.
"""

from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import os
import re
import tarfile
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from index_builder.pairs_io import (
    BAD_LINE,
    BLANK,
    CAPTION_COLUMN,
    EMPTY_CAPTION,
    IMAGE_COLUMN,
    PairsFileError,
    clean_caption,
    json_pair,
    resolve_image,
    row_pair,
)

PAIRS_FILE_SUFFIXES = (".csv", ".tsv", ".txt", ".jsonl", ".ndjson")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_ROWS = 4096
PARQUET_IMAGE_COLUMN = "jpg"  # img2dataset's parquet output
PARQUET_KEY_COLUMN = "key"


class ShardError(Exception):
    """A shard cannot be read (truncated tar, unreadable parquet): the build reports it and goes on."""


@dataclass(frozen=True)
class Sample:
    """One image-caption pair read from a shard."""

    ref: str  # the image's reference in the pair metadata: its path under the images root, or "<shard>/<key>"
    image: bytes | Path  # encoded image bytes, or the file to read them from
    caption: str


@dataclass(frozen=True)
class SourceOptions:
    images_root: Path | None = None  # pairs files only
    image_column: str | None = None  # parquet (default "jpg") and pairs files (default "image")
    caption_column: str | None = None  # default "caption"
    key_column: str = PARQUET_KEY_COLUMN  # parquet; the row number when the column is absent
    shard_rows: int = SHARD_ROWS  # pairs files


@dataclass(frozen=True)
class Shard:
    """A unit of embedding work: ``kind`` is pairs (a byte range of a pairs file), tar, or parquet (a row group)."""

    kind: str
    path: str
    name: str  # unique within the build; also the prefix of a sample's image reference (tar, parquet)
    start: int = 0  # pairs: byte range; parquet: row group
    end: int = 0
    header: tuple[str, ...] = ()  # pairs (CSV/TSV): the column names

    def fingerprint(self) -> str:
        st = os.stat(self.path)
        return f"{self.kind}|{os.path.abspath(self.path)}|{st.st_size}|{st.st_mtime_ns}|{self.start}|{self.end}"

    def samples(self, options: SourceOptions, counts: Counter) -> Iterator[Sample]:
        """Stream the shard's usable samples; skipped ones are counted by reason. Raises ShardError."""
        try:
            if self.kind == "pairs":
                yield from _pairs_samples(self, options, counts)
            elif self.kind == "tar":
                yield from _tar_samples(self, counts)
            else:
                yield from _parquet_samples(self, options, counts)
        except (OSError, EOFError, tarfile.TarError, UnicodeDecodeError) as exc:
            raise ShardError(f"{self.name}: {type(exc).__name__}: {exc}") from exc


def expand_braces(pattern: str) -> list[str]:
    """``a{1..3}b`` -> a1b a2b a3b (zero padding kept: ``{00..10}``), ``a{x,y}`` -> ax ay; nested and repeated."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        items = ["{" + body + "}"]  # not a brace expression: keep it literally
        head = pattern[: m.end()]
        return [head + rest for rest in expand_braces(pattern[m.end() :])]
    out: list[str] = []
    for item in items:
        out.extend(expand_braces(pattern[: m.start()] + item + pattern[m.end() :]))
    return out


def input_files(spec: str | Path) -> list[str]:
    """The files a ``--pairs`` value names: a file, a brace pattern, a glob, or both, in pattern order."""
    files: list[str] = []
    for part in expand_braces(str(spec)):
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matches:
            raise PairsFileError(f"no files match {part!r}")
        files.extend(matches)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PairsFileError(f"pairs file not found: {missing[0]}{more}")
    return list(dict.fromkeys(files))


def input_kind(files: Sequence[str]) -> str:
    kinds = set()
    for f in files:
        suffix = Path(f).suffix.lower()
        if suffix == ".tar":
            kinds.add("tar")
        elif suffix == ".parquet":
            kinds.add("parquet")
        elif suffix in PAIRS_FILE_SUFFIXES:
            kinds.add("pairs")
        else:
            raise PairsFileError(
                f"unsupported pairs input {f!r}: use a .csv/.tsv/.jsonl pairs file, webdataset .tar shards or "
                ".parquet files"
            )
    if len(kinds) > 1:
        raise PairsFileError(f"--pairs mixes input kinds ({', '.join(sorted(kinds))}); build them separately")
    return kinds.pop()


def list_shards(spec: str | Path, options: SourceOptions, problems: dict[str, str]) -> tuple[str, list[Shard]]:
    """(input kind, shards) for a ``--pairs`` value. Files that cannot be opened at all (a parquet file without the
    named column, an unreadable footer) are reported in ``problems`` (name -> message) and left out."""
    files = input_files(spec)
    kind = input_kind(files)
    names = _short_names(files)
    shards: list[Shard] = []
    for f, name in zip(files, names, strict=True):
        if kind == "tar":
            shards.append(Shard("tar", f, name))
        elif kind == "parquet":
            try:
                shards.extend(_parquet_shards(f, name, options))
            except ShardError as exc:
                problems[name] = str(exc)
        else:
            if options.images_root is None or not Path(options.images_root).is_dir():
                raise PairsFileError(f"--images-root must be a folder for a pairs file (got {options.images_root})")
            shards.extend(_pairs_shards(f, name, options))
    return kind, shards


def _short_names(files: Sequence[str]) -> list[str]:
    """File names without their common folder (unique, readable shard names)."""
    if len(files) == 1:
        return [Path(files[0]).name]
    common = os.path.commonpath([os.path.abspath(f) for f in files])
    return [os.path.relpath(os.path.abspath(f), common) for f in files]


# ---------------------------------------------------------------------------------------------
# Pairs files: byte ranges cut at record (and image) boundaries, found in one streaming pass.


def _pairs_format(path: str) -> tuple[str, str]:
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl", ""
    return "csv", "\t" if suffix == ".tsv" else ","


def _records(fh: BinaryIO, fmt: str, delimiter: str) -> Iterator[tuple[int, int, list[str] | str]]:
    """(start offset, end offset, record) of every record after the current position; CSV records may span lines."""
    pos = fh.tell()
    if fmt == "jsonl":
        for raw in fh:
            yield pos, pos + len(raw), raw.decode("utf-8", errors="replace")
            pos += len(raw)
        return
    offsets = deque([pos])  # offsets[i]: where physical line (base + i) starts
    base = 0

    def lines() -> Iterator[str]:
        nonlocal pos
        for raw in fh:
            pos += len(raw)
            offsets.append(pos)
            yield raw.decode("utf-8", errors="replace")

    reader = csv.reader(lines(), delimiter=delimiter)
    for record in reader:
        start = offsets[0]
        while base < reader.line_num:  # the record's lines are consumed: its end is the next line's start
            offsets.popleft()
            base += 1
        yield start, offsets[0], record


def _header(path: str, fmt: str, delimiter: str) -> tuple[tuple[str, ...], int]:
    """(lower-cased column names, offset of the first data record); JSONL has no header."""
    if fmt == "jsonl":
        return (), 0
    with open(path, "rb") as fh:
        for start, end, record in _records(fh, fmt, delimiter):
            del start
            return tuple(str(c).strip().lower() for c in record), end
    return (), 0


def _record_image(record: list[str] | str, header: tuple[str, ...], image_col: str) -> str | None:
    if isinstance(record, str):
        try:
            obj = json.loads(record)
        except json.JSONDecodeError:
            return None
        return str(obj.get(image_col, "")) if isinstance(obj, dict) else None
    try:
        return record[header.index(image_col)]
    except (ValueError, IndexError):
        return None


def _pairs_shards(path: str, name: str, options: SourceOptions) -> list[Shard]:
    fmt, delimiter = _pairs_format(path)
    image_col = (options.image_column or IMAGE_COLUMN).lower()
    caption_col = (options.caption_column or CAPTION_COLUMN).lower()
    header, first = _header(path, fmt, delimiter)
    if fmt == "csv" and (image_col not in header or caption_col not in header):
        raise PairsFileError(
            f"{path} must have a header with columns {image_col!r} and {caption_col!r}; found {list(header)}"
        )
    bounds = [first]
    rows, last_image = 0, None
    with open(path, "rb") as fh:
        fh.seek(first)
        for start, _end, record in _records(fh, fmt, delimiter):
            image = _record_image(record, header, image_col)
            if rows >= options.shard_rows and image != last_image:
                bounds.append(start)
                rows = 0
            rows += 1
            last_image = image
    end = os.path.getsize(path)
    if bounds[-1] < end or len(bounds) == 1:
        bounds.append(end)
    return [
        Shard("pairs", path, f"{name}#{i:05d}", start, stop, header)
        for i, (start, stop) in enumerate(itertools.pairwise(bounds))
    ]


def _pairs_samples(shard: Shard, options: SourceOptions, counts: Counter) -> Iterator[Sample]:
    fmt, delimiter = _pairs_format(shard.path)
    image_col = (options.image_column or IMAGE_COLUMN).lower()
    caption_col = (options.caption_column or CAPTION_COLUMN).lower()
    root = Path(options.images_root or ".")
    with open(shard.path, "rb") as fh:
        fh.seek(shard.start)
        data = fh.read(shard.end - shard.start)
    for _s, _e, record in _records(io.BytesIO(data), fmt, delimiter):
        if isinstance(record, str):
            got = json_pair(record, image_col, caption_col)
        else:
            if not record:
                continue
            got = row_pair(dict(zip(shard.header, record, strict=False)), image_col, caption_col)
        if got == BLANK:
            continue
        if got == BAD_LINE:
            counts["bad_lines"] += 1
            continue
        if got == EMPTY_CAPTION:
            counts["empty_captions"] += 1
            continue
        ref, caption = got
        path = resolve_image(root, ref)
        if path is None:
            counts["unsafe_paths"] += 1
            continue
        yield Sample(ref, path, caption)


# ---------------------------------------------------------------------------------------------
# webdataset tar shards (img2dataset): members KEY.ext grouped by KEY, in tar order.


def _split_member(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name; the rest is the field."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _tar_samples(shard: Shard, counts: Counter) -> Iterator[Sample]:
    with tarfile.open(shard.path, mode="r|*") as tar:  # streamed: members are read in order, once
        key: str | None = None
        fields: dict[str, bytes] = {}
        for member in tar:
            if not member.isfile():
                continue
            k, ext = _split_member(member.name)
            if k != key:
                if key is not None:
                    yield from _tar_sample(shard, key, fields, counts)
                key, fields = k, {}
            fh = tar.extractfile(member)
            fields[ext] = fh.read() if fh is not None else b""
        if key is not None:
            yield from _tar_sample(shard, key, fields, counts)


def _tar_sample(shard: Shard, key: str, fields: dict[str, bytes], counts: Counter) -> Iterator[Sample]:
    image = next((fields[e] for e in IMAGE_EXTENSIONS if e in fields), None)
    caption = clean_caption(fields["txt"].decode("utf-8", errors="replace")) if "txt" in fields else ""
    if not caption and "json" in fields:
        try:
            meta = json.loads(fields["json"])
            caption = clean_caption(meta.get("caption")) if isinstance(meta, dict) else ""
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    if image is None:
        counts["samples_without_image"] += 1
        return
    if not caption:
        counts["samples_without_caption"] += 1
        return
    yield Sample(f"{shard.name}/{key}", image, caption)


# ---------------------------------------------------------------------------------------------
# parquet (img2dataset's parquet output, or any table with image bytes and captions): one shard per row group.


def _pyarrow_parquet():  # the module, imported only for parquet input
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise PairsFileError("parquet input needs pyarrow: pip install 'asif[shards]'") from exc
    return pq


def _parquet_shards(path: str, name: str, options: SourceOptions) -> list[Shard]:
    pq = _pyarrow_parquet()
    image_col = options.image_column or PARQUET_IMAGE_COLUMN
    caption_col = options.caption_column or CAPTION_COLUMN
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/ArrowIOError/OSError for unreadable files
        raise ShardError(f"{name}: not a readable parquet file: {exc}") from exc
    names = pf.schema_arrow.names
    missing = [c for c in (image_col, caption_col) if c not in names]
    if missing:
        raise ShardError(
            f"{name}: no column {missing[0]!r} (columns: {', '.join(names)}); choose them with --image-column and "
            "--caption-column"
        )
    return [Shard("parquet", path, f"{name}#rg{g:04d}", g, g + 1) for g in range(pf.num_row_groups)]


def _parquet_samples(shard: Shard, options: SourceOptions, counts: Counter) -> Iterator[Sample]:
    pq = _pyarrow_parquet()
    image_col = options.image_column or PARQUET_IMAGE_COLUMN
    caption_col = options.caption_column or CAPTION_COLUMN
    try:
        pf = pq.ParquetFile(shard.path)
        has_key = options.key_column in pf.schema_arrow.names
        columns = [image_col, caption_col] + ([options.key_column] if has_key else [])
        table = pf.read_row_group(shard.start, columns=columns)
    except Exception as exc:  # ArrowInvalid etc.: a damaged row group
        raise ShardError(f"{shard.name}: {type(exc).__name__}: {exc}") from exc
    images = table.column(image_col).to_pylist()
    captions = table.column(caption_col).to_pylist()
    keys = table.column(options.key_column).to_pylist() if has_key else None
    for i, (image, text) in enumerate(zip(images, captions, strict=True)):
        key = str(keys[i]) if keys is not None and keys[i] is not None else str(i)
        caption = clean_caption(text)
        if not image:
            counts["samples_without_image"] += 1
            continue
        if not caption:
            counts["samples_without_caption"] += 1
            continue
        yield Sample(f"{shard.name}/{key}", bytes(image), caption)
