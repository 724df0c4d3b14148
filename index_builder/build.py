"""`asif build`: embed image-caption pairs once and write a servable index folder (or a shared Milvus model).

Steps:

1. list the input's shards (:mod:`index_builder.sources`: a pairs file cut into chunks, webdataset tars, parquet
   row groups);
2. embed each shard not embedded yet into ``<out>/.build/shards/`` (:mod:`index_builder.embed_step`,
   :mod:`index_builder.shard_embed`; decoding in worker processes, or on a Ray cluster with ``--ray``), so a killed
   build resumes shard by shard and a shard that cannot be read is reported and skipped;
3. form the anchors shard by shard and read them back in at most three passes over the shard files, one file in
   memory at a time (memory holds the index, never all embeddings):

   a. count them (:mod:`index_builder.counting`), with ``--auto`` hashing every image vector too;
   b. read the FAISS indices' seeded training sample and, with ``--auto``, the held-out rows (no pass when neither
      is needed);
   c. fill the FAISS indices (:mod:`index_builder.folder_out`) or load Milvus (:mod:`index_builder.milvus_out`)
      while, with ``--auto``, searching the held-out rows' neighbours; then choose the served k and weighting
      (:mod:`index_builder.auto_select`: held-out images' mrr of their own captions over a few splits);

4. write metadata, indices and manifest through :mod:`asif.state.persist` (manifest last: never half-written; the
   choice only sets its defaults).

Anchors (``--anchors``):

- ``caption`` (default): one anchor per caption; the image embedding is repeated for each caption
  (Flickr8k: 40,450 anchors). Measured better at the default k=800, p=8 (docs/evaluation.md).
- ``image``: one anchor per image; its text side is the L2-normalised mean of its captions' embeddings (Flickr8k:
  8,090 anchors from 40,450 captions). Captions are grouped by image within a shard: the rows of one image must be
  consecutive in a pairs file (as in Flickr8k's ``captions.csv``) or in one shard.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from asif.encoders import ImageEncoder, TextEncoder, load_image_encoder, load_text_encoder
from asif.math.anchors import ANCHOR_MODES
from asif.math.relrep import Weighting, check_k_p
from asif.state.persist import MANIFEST
from asif.stores.milvus_store import MilvusIndex
from asif.tuning.autoselect import AutoChoice
from index_builder.auto_select import KEYS_PASS, StreamedSelection
from index_builder.config import BuildConfig
from index_builder.counting import count_anchors
from index_builder.embed_step import embed
from index_builder.errors import AlreadyBuiltError, AutoTooFewImagesError, BuildError
from index_builder.folder_out import write_folder
from index_builder.milvus_out import check_target, open_client, write_milvus
from index_builder.output import Output
from index_builder.quantize_step import check_quantize, quantize
from index_builder.report import SKIP_REASONS, BuildReport
from index_builder.sources import SourceOptions, list_shards
from index_builder.work_dir import WORK_DIR, fingerprint, pending_shards, prepare_work_dir, shard_file


def run_build(
    config: BuildConfig,
    image_encoder: ImageEncoder | None = None,
    text_encoder: TextEncoder | None = None,
    log: TextIO | None = None,
    after_shard: Callable[[str], None] | None = None,
) -> BuildReport:
    """Build (or resume building) an index folder, or load a shared model into Milvus (``config.store``).
    ``log``: where the progress goes (default: ``sys.stderr`` at the time of the call, so a redirection applies).
    ``after_shard(name)`` runs after each shard's embedding file is written (a test hook)."""
    log = sys.stderr if log is None else log
    check_k_p(config.k, config.p)
    config.default_weighting()  # a bad weighting fails before any work
    check_quantize(config)
    if config.store == "faiss":
        if (Path(config.out) / MANIFEST).exists() and not config.force:
            raise AlreadyBuiltError(f"{config.out} already holds an index; pass --force to rebuild it")
        return _build(config, None, image_encoder, text_encoder, log, after_shard)
    if config.store != "milvus":
        raise BuildError(f"unknown store {config.store!r}; choose faiss or milvus")
    MilvusIndex.parse(config.milvus_index)  # a bad spec fails before any work
    client = open_client(config.milvus_uri)
    try:
        check_target(client, config.milvus_prefix, config.force)
        return _build(config, client, image_encoder, text_encoder, log, after_shard)
    finally:
        client.close()


def _build(
    config: BuildConfig,
    client: Any,
    image_encoder: ImageEncoder | None,
    text_encoder: TextEncoder | None,
    log: TextIO,
    after_shard: Callable[[str], None] | None,
) -> BuildReport:
    t_start = time.perf_counter()
    out = Path(config.out)
    if config.anchors not in ANCHOR_MODES:
        raise BuildError(f"unknown anchor mode {config.anchors!r}; choose one of {ANCHOR_MODES}")
    if config.shard_rows < 1:
        raise BuildError("--shard-rows must be at least 1")
    options = SourceOptions(
        images_root=Path(config.images_root) if config.images_root else None,
        image_column=config.image_column,
        caption_column=config.caption_column,
        key_column=config.key_column,
        shard_rows=config.shard_rows,
    )
    report = BuildReport()
    kind, shards = list_shards(config.pairs, options, report.failed_shards)
    report.shards = len(shards) + len(report.failed_shards)

    if image_encoder is None or text_encoder is None:
        print(f"loading encoders {config.image_encoder!r} and {config.text_encoder!r}", file=log)
    image_encoder = image_encoder or load_image_encoder(
        config.image_encoder, config.device, config.batch_size, config.runtime
    )
    text_encoder = text_encoder or load_text_encoder(
        config.text_encoder, config.device, config.batch_size, config.runtime
    )
    out.mkdir(parents=True, exist_ok=True)
    quantize(config, options, image_encoder, shards, out, log)
    image_id, text_id = image_encoder.identity.to_dict(), text_encoder.identity.to_dict()
    work = out / WORK_DIR
    prepare_work_dir(work, fingerprint(config, kind, image_id, text_id), log)
    todo, report.shards_resumed, report.images_resumed = pending_shards(work, shards)
    embed(config, options, todo, work, image_encoder, text_encoder, [image_id, text_id], report, log, after_shard)
    files = [shard_file(work, s) for s in shards if s.name not in report.failed_shards]
    if not files:
        why = "; ".join(f"{n}: {w}" for n, w in report.failed_shards.items()) or "the input has no shards"
        raise BuildError(f"no usable pairs in {config.pairs} ({why})")

    skipped: Counter = Counter(dict.fromkeys(SKIP_REASONS, 0))  # every reason in the report, zero or not
    selection = StreamedSelection(config.seed) if config.auto else None
    keys = {KEYS_PASS: selection.add_keys} if selection is not None else {}
    counted = count_anchors(files, config.anchors, report, skipped, keys)
    report.skipped = dict(skipped)
    if counted.n == 0:
        raise BuildError("no anchors: every image was unreadable or every sample was skipped")
    report.pairs = counted.n
    if selection is not None:
        selection = _hold_out(config, selection, counted.n, report, log)

    def manifest() -> dict[str, Any]:
        """The manifest, asked for by the writers after their last pass (which completes --auto's choice)."""
        choice = selection.choice() if selection is not None else None
        return _manifest(config, kind, image_id, text_id, choice, report)

    dims = {"image": image_encoder.dim, "text": text_encoder.dim}
    output = Output(config, counted, dims, selection, manifest, report, log)
    if client is not None:
        write_milvus(output, client)
    else:
        write_folder(output, out, t_start)
    shutil.rmtree(work, ignore_errors=True)
    if client is not None:
        with contextlib.suppress(OSError):
            out.rmdir()  # it only held the work files
    report.total_seconds = time.perf_counter() - t_start
    return report


def _hold_out(
    config: BuildConfig, selection: StreamedSelection, n_pairs: int, report: BuildReport, log: TextIO
) -> StreamedSelection | None:
    """``selection`` with its held-out splits; None (and why, in the report) when the default choice has too few
    images."""
    try:
        selection.hold_out(n_pairs, log)
    except AutoTooFewImagesError as exc:
        if not config.auto_fallback:
            raise
        why = f"{exc}; recorded k={config.k} and {config.default_weighting().describe()}"
        report.auto = {"not_chosen": why}
        return None
    return selection


def _manifest(
    config: BuildConfig,
    kind: str,
    image_id: dict[str, Any],
    text_id: dict[str, Any],
    choice: AutoChoice | None,
    report: BuildReport,
) -> dict[str, Any]:
    """The model's manifest (the writers add where they keep it), with --auto's ``choice`` (also in the report)."""
    if choice is None:
        defaults = _served_defaults(config.k, config.default_weighting(), config.p)
    else:
        defaults = _served_defaults(choice.k, choice.weighting, config.p)
        report.auto = {
            "k": choice.k,
            "weighting": choice.weighting.to_dict(),
            "mrr": choice.score,
            "held_out_images": choice.held_out_images[0],
            "seeds": list(choice.seeds),
            "seconds": round(choice.seconds, 1),
        }
    return {
        "image_encoder": image_id,
        "text_encoder": text_id,
        "anchors": config.anchors,
        "defaults": defaults,
        **({"auto": choice.entry()} if choice else {}),
        "next_pair_id": report.pairs,
        "counts": {
            "pairs": report.pairs,
            "rows": report.rows,
            "captions": report.captions,
            "images": report.images,
            "skipped": report.skipped,
        },
        "build": {
            "pairs_file": str(config.pairs),
            "images_root": str(config.images_root) if config.images_root else None,
            "input": kind,
            "shards": report.shards,
            "failed_shards": report.failed_shards,
        },
    }


def _served_defaults(k: int, weighting: Weighting, p: float) -> dict[str, Any]:
    """The manifest's defaults: k, the weighting, and p (the weighting's when it is power, else ``p``: what a request
    asking for the power weighting without its p gets)."""
    served_p = weighting.param if weighting.kind == "power" else float(p)
    return {"k": int(k), "p": served_p, "weighting": weighting.to_dict()}
