"""`asif build --store milvus`: load the embedded anchors into a shared model in Milvus (see asif.serving.shared_live).

The stores and the pair rows are written first, the manifest last: replicas (and a rebuild) take a prefix with
a manifest as a built model, and a prefix without one as the leftovers of an interrupted load, dropped here.
Pairs are numbered 0..n-1, as in an index folder; pairs added live later get time-ordered ids above them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from asif.state.milvus_meta import PREFIX_PATTERN, MilvusMetadata, drop_shared, read_manifest, shared_collections
from asif.stores.milvus_store import MilvusIndex, MilvusStore, load_rows
from index_builder.anchor_chunks import AnchorChunk, anchor_pass, read_pass
from index_builder.errors import AlreadyBuiltError, BuildError
from index_builder.output import Output

BULK = 20_000  # rows per store add (each is flushed into a sealed segment)


class MilvusTargetError(BuildError):
    """The Milvus database cannot be reached, or the prefix is not a valid collection name."""


def open_client(uri: str) -> Any:
    from pymilvus import MilvusClient

    try:
        return MilvusClient(uri)
    except Exception as exc:  # pymilvus raises its own MilvusException and grpc errors
        raise MilvusTargetError(f"cannot open Milvus at {uri!r}: {exc}") from exc


def check_target(client: Any, prefix: str, force: bool) -> None:
    """Refuse to overwrite a built model unless ``force``; a half-loaded prefix is always cleared later."""
    if not re.match(PREFIX_PATTERN, prefix):
        raise MilvusTargetError(
            f"bad Milvus prefix {prefix!r}: letters, digits and _, not starting with a digit, at most 41 characters"
        )
    if read_manifest(client, prefix) is not None and not force:
        raise AlreadyBuiltError(f"Milvus prefix {prefix!r} already holds a model; pass --force to rebuild it")


def load_milvus(
    client: Any,
    prefix: str,
    index: MilvusIndex,
    dims: dict[str, int],
    chunks: Iterable[AnchorChunk],
    total: int,
    manifest: Callable[[], dict[str, Any]],
    log: TextIO = sys.stderr,
) -> dict[str, str]:
    """Replace the model ``prefix`` with these anchors, streamed chunk by chunk (pair ids numbered in order, from
    0; ``total`` of them), and write ``manifest()`` last (asked for once the chunks are consumed). Rows are buffered up
    to BULK per store add. Returns the index spec per role."""
    if shared_collections(client, prefix):
        print(f"dropping the collections of Milvus prefix {prefix!r}", file=log)
        drop_shared(client, prefix)
    metadata = MilvusMetadata(client, prefix, dims["text"])
    stores = {role: MilvusStore(client, f"{prefix}_{role}", dims[role], index) for role in ("image", "text")}
    bar = tqdm(total=3 * total, desc="milvus", unit="row", file=sys.stderr)
    buffered: list[AnchorChunk] = []

    def flush() -> None:
        if not buffered:
            return
        first = buffered[0].first_id
        for role in ("image", "text"):
            vectors = np.concatenate([c.vectors[role] for c in buffered])
            load_rows(stores[role], vectors, BULK, bar.update, first_id=first)
        for c in buffered:
            seen: set[str] = set()  # one thumbnail per image
            rows = []
            for i, (ref, caps) in enumerate(c.pairs):
                thumb = c.thumbnails.get(ref) if ref not in seen else None
                seen.add(ref)
                rows.append((c.first_id + i, ref, caps, thumb))
            bar.update(metadata.insert_pairs(rows))
        buffered.clear()

    for chunk in chunks:
        buffered.append(chunk)
        if sum(len(c.pairs) for c in buffered) >= BULK:
            flush()
    flush()
    bar.close()
    client.flush(f"{prefix}_pairs")
    metadata.set_meta("manifest", {**manifest(), "store": "milvus", "milvus_index": index.to_dict()})
    return {role: f"milvus:{index.type}" for role in ("image", "text")}


def write_milvus(output: Output, client: Any) -> None:
    """Load the counted anchors into the model ``config.milvus_prefix`` in one pass over the shard files that also
    searches ``--auto``'s neighbours (after one that gathers its held-out rows), the manifest last."""
    config, counted = output.config, output.counted
    with output.timing_index():
        read_pass(counted.files, config.anchors, output.held_out())
        chunks = (chunk for _, chunk in anchor_pass(counted.files, config.anchors, None, output.neighbours()))
        index = MilvusIndex.parse(config.milvus_index)
        output.report.index = load_milvus(
            client, config.milvus_prefix, index, output.dims, chunks, counted.n, output.manifest, output.log
        )
