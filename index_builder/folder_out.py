"""`asif build` into an index folder: the two FAISS stores trained on a seeded sample read back from the shard
files and filled shard by shard (memory holds the index, never all embeddings), the pair metadata beside them, and
the folder committed through :mod:`asif.state.persist` (manifest last: never half-written)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

import numpy as np

from asif.state.metadata import PairMetadata
from asif.state.persist import read_manifest, save_index_folder
from asif.stores import FaissStore, choose_index_spec
from index_builder.anchor_chunks import AnchorChunk, RowGather, anchor_pass, read_pass
from index_builder.config import BuildConfig
from index_builder.counting import Counted
from index_builder.output import Output
from index_builder.report import BuildReport


def _training_picks(n: int, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray | None]:
    """A seeded sample of ``sizes[role]`` pair ids per role (None: all, when the size is n)."""
    rng = np.random.default_rng(seed)
    return {role: np.sort(rng.choice(n, size, replace=False)) if size < n else None for role, size in sizes.items()}


def _stores(
    config: BuildConfig, counted: Counted, dims: dict[str, int], report: BuildReport, log: TextIO
) -> dict[str, FaissStore]:
    """The two FAISS stores (empty, untrained) that ``config`` asks for over the counted anchors."""
    stores = {}
    for role, dim in dims.items():
        spec = choose_index_spec(
            counted.n,
            dim,
            config.index_type,
            refine=config.rerank,
            rerank_factor=config.rerank_factor,
            distinct=counted.distinct[role],
        )
        print(f"building {role} index {spec.factory} over {counted.n} anchors", file=log)
        stores[role] = FaissStore(dim, spec)
        report.index[role] = spec.factory
    return stores


def _train(stores: dict[str, FaissStore], samples: dict[str, np.ndarray]) -> None:
    for role, sample in samples.items():
        stores[role].train(sample)


def _fill(stores: dict[str, FaissStore], metadata: PairMetadata, chunks: Iterator[AnchorChunk]) -> None:
    for chunk in chunks:
        for role, store in stores.items():
            store.add(chunk.ids, chunk.vectors[role])
        metadata.insert_pairs((int(i), ref, caps) for i, (ref, caps) in zip(chunk.ids, chunk.pairs, strict=True))
        metadata.insert_thumbnails(chunk.thumbnails.items())


def write_folder(output: Output, out: Path, t_start: float) -> None:
    """Train the two FAISS stores on a seeded sample read back from the shard files (in a pass that also gathers
    ``--auto``'s held-out rows) and fill them shard by shard (in a pass that also searches their neighbours), then
    write the index folder ``out`` with ``output.manifest()``, asked for once the stores are filled (manifest last)."""
    config, files, n, report = output.config, output.counted.files, output.counted.n, output.report
    with output.timing_index():
        stores = _stores(config, output.counted, output.dims, report, output.log)
        untrained = {role: min(n, max(s.spec.train_size, 1)) for role, s in stores.items() if not s.is_trained}
        sample = RowGather(_training_picks(n, untrained, config.seed))
        training = {"training sample": sample.add} if untrained else {}
        read_pass(files, config.anchors, {**training, **output.held_out()})  # no pass when neither is needed
        _train(stores, sample.rows())

        metadata_name = f"pairs-{secrets.token_hex(4)}.sqlite"
        metadata = PairMetadata(out / metadata_name)
        try:
            chunks = anchor_pass(files, config.anchors, "filling the index", output.neighbours())
            _fill(stores, metadata, (chunk for _, chunk in chunks))
            metadata.set_meta("next_pair_id", str(n))
        finally:
            metadata.close()
    manifest = output.manifest()

    report.total_seconds = time.perf_counter() - t_start
    build = {**manifest["build"], "seconds": round(report.total_seconds, 1), "report": asdict(report)}
    manifest = {**manifest, "metadata": metadata_name, "build": build}
    save_index_folder(out, stores["image"], stores["text"], manifest)
    for stale in out.glob("pairs-*.sqlite*"):
        if not stale.name.startswith(metadata_name):
            stale.unlink(missing_ok=True)
    read_manifest(out)  # the committed folder reads back
