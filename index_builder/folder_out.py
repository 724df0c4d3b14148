"""`asif build` into an index folder: the two FAISS stores trained on a seeded sample read back from the shard
files and filled shard by shard (memory holds the index, never all embeddings), the pair metadata beside them, and
the folder committed through :mod:`asif.state.persist` (manifest last: never half-written)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from asif.state.metadata import PairMetadata
from asif.state.persist import read_manifest, save_index_folder
from asif.stores import FaissStore, choose_index_spec
from index_builder.anchor_chunks import AnchorChunk, anchor_chunks, gather_rows
from index_builder.config import BuildConfig
from index_builder.report import BuildReport


def _training_samples(files: list[Path], mode: str, n: int, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """A seeded sample of ``sizes[role]`` anchors per role (all when the size is n), read from the shard files."""
    rng = np.random.default_rng(seed)
    picks = {role: np.sort(rng.choice(n, size, replace=False)) if size < n else None for role, size in sizes.items()}
    return gather_rows((chunk for _, chunk in anchor_chunks(files, mode)), picks)


def _fill(stores: dict[str, FaissStore], metadata: PairMetadata, chunks: Iterator[AnchorChunk]) -> None:
    for chunk in chunks:
        for role, store in stores.items():
            store.add(chunk.ids, chunk.vectors[role])
        metadata.insert_pairs((int(i), ref, caps) for i, (ref, caps) in zip(chunk.ids, chunk.pairs, strict=True))
        metadata.insert_thumbnails(chunk.thumbnails.items())


def write_folder(
    config: BuildConfig,
    out: Path,
    files: list[Path],
    dims: dict[str, int],
    n: int,
    distinct: dict[str, int],
    manifest: dict[str, Any],
    report: BuildReport,
    t_start: float,
    log: TextIO,
) -> None:
    """Train (on a sample read back from the shard files) and fill the two FAISS stores shard by shard, and write
    the index folder (manifest last)."""
    t0 = time.perf_counter()
    stores = {}
    for role, dim in dims.items():
        spec = choose_index_spec(
            n, dim, config.index_type, refine=config.rerank, rerank_factor=config.rerank_factor, distinct=distinct[role]
        )
        print(f"building {role} index {spec.factory} over {n} anchors", file=log)
        stores[role] = FaissStore(dim, spec)
        report.index[role] = spec.factory
    untrained = {role: min(n, max(s.spec.train_size, 1)) for role, s in stores.items() if not s.is_trained}
    if untrained:
        for role, sample in _training_samples(files, config.anchors, n, untrained, config.seed).items():
            stores[role].train(sample)

    metadata_name = f"pairs-{secrets.token_hex(4)}.sqlite"
    metadata = PairMetadata(out / metadata_name)
    try:
        _fill(stores, metadata, (chunk for _, chunk in anchor_chunks(files, config.anchors)))
        metadata.set_meta("next_pair_id", str(n))
    finally:
        metadata.close()
    report.index_seconds = time.perf_counter() - t0

    report.total_seconds = time.perf_counter() - t_start
    build = {**manifest["build"], "seconds": round(report.total_seconds, 1), "report": asdict(report)}
    manifest = {**manifest, "metadata": metadata_name, "build": build}
    save_index_folder(out, stores["image"], stores["text"], manifest)
    for stale in out.glob("pairs-*.sqlite*"):
        if not stale.name.startswith(metadata_name):
            stale.unlink(missing_ok=True)
    read_manifest(out)  # the committed folder reads back
