"""parquet shards (img2dataset's parquet output, or any table with image bytes and captions): one shard per row
group. pyarrow is imported only when parquet input is read."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from index_builder.pairs_io import CAPTION_COLUMN, PairsFileError, clean_caption
from index_builder.samples import PARQUET_IMAGE_COLUMN, Sample, ShardError, SourceOptions


def _pyarrow_parquet():  # the module, imported only for parquet input
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise PairsFileError("parquet input needs pyarrow: pip install 'asif[shards]'") from exc
    return pq


def parquet_row_groups(path: str, name: str, options: SourceOptions) -> int:
    """The number of row groups (one shard each) of a parquet file that has the image and caption columns.
    Raises ShardError (named ``name``) when the file cannot be read or lacks a column."""
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
    return int(pf.num_row_groups)


def parquet_samples(path: str, row_group: int, name: str, options: SourceOptions, counts: Counter) -> Iterator[Sample]:
    """The usable samples of one row group, referenced as ``<name>/<key>``; skipped ones are counted by reason."""
    pq = _pyarrow_parquet()
    image_col = options.image_column or PARQUET_IMAGE_COLUMN
    caption_col = options.caption_column or CAPTION_COLUMN
    try:
        pf = pq.ParquetFile(path)
        has_key = options.key_column in pf.schema_arrow.names
        columns = [image_col, caption_col] + ([options.key_column] if has_key else [])
        table = pf.read_row_group(row_group, columns=columns)
    except Exception as exc:  # ArrowInvalid etc.: a damaged row group
        raise ShardError(f"{name}: {type(exc).__name__}: {exc}") from exc
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
        yield Sample(f"{name}/{key}", bytes(image), caption)
