"""webdataset tar shards (img2dataset): members KEY.ext grouped by KEY, in tar order, streamed once."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from collections.abc import Iterator

from index_builder.pairs_io import clean_caption
from index_builder.samples import Sample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _split_member(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name; the rest is the field."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def tar_samples(path: str, prefix: str, counts: Counter) -> Iterator[Sample]:
    """The usable samples of a tar file, referenced as ``<prefix>/<key>``; skipped ones are counted by reason."""
    with tarfile.open(path, mode="r|*") as tar:  # streamed: members are read in order, once
        key: str | None = None
        fields: dict[str, bytes] = {}
        for member in tar:
            if not member.isfile():
                continue
            k, ext = _split_member(member.name)
            if k != key:
                if key is not None:
                    yield from _tar_sample(prefix, key, fields, counts)
                key, fields = k, {}
            fh = tar.extractfile(member)
            fields[ext] = fh.read() if fh is not None else b""
        if key is not None:
            yield from _tar_sample(prefix, key, fields, counts)


def _tar_sample(prefix: str, key: str, fields: dict[str, bytes], counts: Counter) -> Iterator[Sample]:
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
    yield Sample(f"{prefix}/{key}", image, caption)
