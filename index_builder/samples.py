"""What a shard reader is told and what it yields: the reader options, one image-caption sample, and the error of
a shard that cannot be read. Shared by the listing of shards (`index_builder.sources`) and the per-format readers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
