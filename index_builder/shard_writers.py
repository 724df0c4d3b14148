"""Write pairs as img2dataset-style shards: webdataset ``.tar`` files or parquet files.

Used by the tests and the build benchmark to turn a pairs file into the formats `asif build` reads, and handy for
trying the sharded path on a collection of your own::

    python -m index_builder.shard_writers --pairs captions.csv --images-root images --out shards --shards 16 \\
        --format tar

The rows of one image stay in one shard (shards are cut at image boundaries), so ``--anchors image`` groups them.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

from index_builder.pairs_io import read_pairs


def _split(rows: Sequence[tuple[str, str]], n_shards: int) -> list[list[tuple[int, str, str]]]:
    """(row number, image, caption) rows cut into about n_shards parts, never between two rows of one image."""
    size = max(1, -(-len(rows) // max(1, n_shards)))
    parts: list[list[tuple[int, str, str]]] = [[]]
    for i, (image, caption) in enumerate(rows):
        if len(parts[-1]) >= size and parts[-1][-1][1] != image:
            parts.append([])
        parts[-1].append((i, image, caption))
    return [p for p in parts if p]


def _sample_key(row: int) -> str:
    return f"{row:09d}"


def write_webdataset(
    rows: Sequence[tuple[str, str]], images_root: Path, out: Path, n_shards: int, pattern: str = "{:05d}.tar"
) -> list[Path]:
    """One sample per row: ``KEY.jpg`` (the image file's bytes), ``KEY.txt`` (the caption), ``KEY.json``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, part in enumerate(_split(rows, n_shards)):
        path = out / pattern.format(s)
        with tarfile.open(path, "w") as tar:
            for row, image, caption in part:
                key = _sample_key(row)
                data = (images_root / image).read_bytes()
                meta = json.dumps({"key": key, "caption": caption, "source_image": image}).encode()
                for name, blob in ((f"{key}.jpg", data), (f"{key}.txt", caption.encode()), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
        paths.append(path)
    return paths


def write_parquet(
    rows: Sequence[tuple[str, str]],
    images_root: Path,
    out: Path,
    n_files: int,
    row_group_size: int = 1024,
    image_column: str = "jpg",
    caption_column: str = "caption",
) -> list[Path]:
    """img2dataset's parquet layout: ``key``, the image bytes (``jpg``) and ``caption`` columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, part in enumerate(_split(rows, n_files)):
        table = pa.table(
            {
                "key": [_sample_key(row) for row, image, _ in part],
                image_column: [(images_root / image).read_bytes() for _, image, _ in part],
                caption_column: [caption for _, _, caption in part],
            }
        )
        path = out / f"{s:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=Path, required=True)
    ap.add_argument("--images-root", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--format", choices=("tar", "parquet"), default="tar")
    args = ap.parse_args(argv)
    rows = read_pairs(args.pairs).rows
    write = write_webdataset if args.format == "tar" else write_parquet
    paths = write(rows, args.images_root, args.out, args.shards)
    print(f"{len(rows)} pairs written to {len(paths)} {args.format} shards in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
