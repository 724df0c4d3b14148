"""Where `asif build` reads pairs from, cut into shards that are embedded (and resumed) one at a time.

``--pairs`` names one of:

- a CSV/TSV/JSONL pairs file (``image,caption`` rows, images under ``--images-root``): cut into shards of about
  ``shard_rows`` rows at image boundaries (the rows of one image, when consecutive, stay in one shard);
- webdataset ``.tar`` shards as img2dataset writes them (``KEY.jpg``/``.png``/``.webp`` + ``KEY.txt`` [+ ``KEY.json``]),
  named by a brace pattern (``data/{00000..00127}.tar``) or a glob (``data/*.tar``): one shard per file;
- parquet files with the image bytes and the caption in columns (img2dataset: ``jpg`` and ``caption``): one shard
  per row group.

A shard is a small picklable descriptor (a file, a byte range or a row group), so shards can be sent to worker
processes or Ray actors. Reading a shard streams its samples (the readers: `pairs_reader`, `tar_reader`,
`parquet_reader`); nothing holds all rows of a collection.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from index_builder.pairs_io import PairsFileError
from index_builder.pairs_reader import pairs_ranges, pairs_samples
from index_builder.parquet_reader import parquet_row_groups, parquet_samples
from index_builder.samples import SHARD_ROWS, Sample, ShardError, SourceOptions
from index_builder.tar_reader import tar_samples

__all__ = ["SHARD_ROWS", "Sample", "Shard", "ShardError", "SourceOptions", "input_files", "list_shards"]

PAIRS_FILE_SUFFIXES = (".csv", ".tsv", ".txt", ".jsonl", ".ndjson")


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
                yield from pairs_samples(self.path, self.start, self.end, self.header, options, counts)
            elif self.kind == "tar":
                yield from tar_samples(self.path, self.name, counts)
            else:
                yield from parquet_samples(self.path, self.start, self.name, options, counts)
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
                groups = parquet_row_groups(f, name, options)
            except ShardError as exc:
                problems[name] = str(exc)
                continue
            shards.extend(Shard("parquet", f, f"{name}#rg{g:04d}", g, g + 1) for g in range(groups))
        else:
            if options.images_root is None or not Path(options.images_root).is_dir():
                raise PairsFileError(f"--images-root must be a folder for a pairs file (got {options.images_root})")
            header, ranges = pairs_ranges(f, options)
            shards.extend(
                Shard("pairs", f, f"{name}#{i:05d}", start, stop, header) for i, (start, stop) in enumerate(ranges)
            )
    return kind, shards


def _short_names(files: Sequence[str]) -> list[str]:
    """File names without their common folder (unique, readable shard names)."""
    if len(files) == 1:
        return [Path(files[0]).name]
    common = os.path.commonpath([os.path.abspath(f) for f in files])
    return [os.path.relpath(os.path.abspath(f), common) for f in files]
