"""Pairs files (CSV/TSV/JSONL) as shards: byte ranges cut at record (and image) boundaries, found in one streaming
pass, and the samples of one range."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from index_builder.pairs_io import (
    BAD_LINE,
    BLANK,
    CAPTION_COLUMN,
    EMPTY_CAPTION,
    IMAGE_COLUMN,
    PairsFileError,
    json_pair,
    resolve_image,
    row_pair,
)
from index_builder.samples import Sample, SourceOptions


def pairs_format(path: str) -> tuple[str, str]:
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


def pairs_ranges(path: str, options: SourceOptions) -> tuple[tuple[str, ...], list[tuple[int, int]]]:
    """(the CSV/TSV header, the byte ranges of the file's shards): about ``options.shard_rows`` records each, cut
    where the image changes (the rows of one image, when consecutive, stay in one shard)."""
    fmt, delimiter = pairs_format(path)
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
    return header, list(itertools.pairwise(bounds))


def pairs_samples(
    path: str, start: int, end: int, header: tuple[str, ...], options: SourceOptions, counts: Counter
) -> Iterator[Sample]:
    """The usable samples of the byte range [start, end) of a pairs file; skipped ones are counted by reason."""
    fmt, delimiter = pairs_format(path)
    image_col = (options.image_column or IMAGE_COLUMN).lower()
    caption_col = (options.caption_column or CAPTION_COLUMN).lower()
    root = Path(options.images_root or ".")
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(end - start)
    for _s, _e, record in _records(io.BytesIO(data), fmt, delimiter):
        if isinstance(record, str):
            got = json_pair(record, image_col, caption_col)
        else:
            if not record:
                continue
            got = row_pair(dict(zip(header, record, strict=False)), image_col, caption_col)
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
