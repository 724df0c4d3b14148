"""`asif build`: embed image-caption pairs once and write a servable index folder (or a shared Milvus model).

Steps:

1. list the input's shards (:mod:`index_builder.sources`: a pairs file cut into chunks, webdataset tars, parquet
   row groups);
2. embed each shard not embedded yet into ``<out>/.build/shards/`` (:mod:`index_builder.shard_embed`; decoding in
   worker processes, or on a Ray cluster with ``--ray``), so a killed build resumes shard by shard and a shard that
   cannot be read is reported and skipped;
3. with ``--auto``, choose the served k and weighting from the pairs (:mod:`index_builder.auto_select`: held-out
   images' mrr of their own captions over a few splits, three more passes over the shard files);
4. form the anchors shard by shard; train the FAISS indices on a seeded sample read back from the shard files and
   fill them shard by shard (memory holds the index, never all embeddings);
5. write metadata, indices and manifest through :mod:`asif.state.persist` (manifest last: never half-written).

Anchors (``--anchors``):

- ``caption`` (default): one anchor per caption; the image embedding is repeated for each caption
  (Flickr8k: 40,450 anchors). Measured better at the default k=800, p=8 (docs/evaluation.md).
- ``image``: one anchor per image; its text side is the L2-normalised mean of its captions' embeddings (Flickr8k:
  8,090 anchors from 40,450 captions). Captions are grouped by image within a shard: the rows of one image must be
  consecutive in a pairs file (as in Flickr8k's ``captions.csv``) or in one shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from asif.encoders import ImageEncoder, TextEncoder, load_image_encoder, load_text_encoder
from asif.encoders.images import DEFAULT_MAX_PIXELS
from asif.encoders.quantize import (
    QUANTIZED_FILE,
    QuantizeError,
    calibration_images,
    check_choice,
    quantize_image_encoder,
)
from asif.math.anchors import ANCHOR_MODES
from asif.math.relrep import DEFAULT_K, DEFAULT_P, PARAM_NAMES, Weighting, check_k_p
from asif.state.metadata import PairMetadata
from asif.state.persist import MANIFEST, read_manifest, save_index_folder, write_json_atomic
from asif.stores import RERANK_FACTOR, FaissStore, choose_index_spec, count_distinct_rows
from asif.stores.milvus_store import MilvusIndex
from asif.tuning.autoselect import AutoChoice
from index_builder.anchor_chunks import AnchorChunk, anchor_chunks, gather_rows
from index_builder.auto_select import auto_select
from index_builder.decode import Decoder
from index_builder.errors import AlreadyBuiltError, BuildError
from index_builder.milvus_out import check_target, load_milvus, open_client
from index_builder.shard_embed import ShardEmbedding, StageTimes, embed_shard, stored_meta, write_atomic
from index_builder.sources import SHARD_ROWS, Shard, ShardError, SourceOptions, list_shards

WORK_DIR = ".build"
SKIP_REASONS = (
    "empty_captions",
    "bad_lines",
    "unsafe_paths",
    "samples_without_image",
    "samples_without_caption",
    "unreadable_images",
    "captions_of_unreadable_images",
)


def default_decode_workers() -> int:
    """Decode processes: cores - 1, at least 1, at most 8.

    Measured on 2 cores (bench/build_runtime.py and 2,000-5,000-row Flickr8k builds, a quiet machine): one worker
    decodes, thumbnails and prepares a photo in 1.6-2.2 ms of CPU while ONNX Runtime's effnet-lite0 (2 intra-op
    threads) embeds 135-165 img/s, so the one worker this gives keeps the encoder fed: it waited 0.2-0.3 s of a
    7-20 s embedding step (``StageTimes.wait_seconds``, the report's decode line; mostly the first batch of each
    shard and the worker's start). With 0 workers the encoder alone runs faster (~185 img/s: no process shares its
    cores) but decoding then runs in series with it: the same wall time on Flickr8k's 224 px photos, and slower on
    larger ones. A second worker on 2 cores only competes with the encoder's threads. Larger photos (img2dataset at
    384-512 px, camera photos of several megapixels: 20-100 ms to decode) need more workers on larger machines, up
    to 8; workers not needed stay idle (the build decodes one read batch ahead: at most 16 tasks of 16 images) and
    cost only their memory.
    """
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def weighting_of(kind: str, p: float | None = None, t: float | None = None, r0: float | None = None) -> Weighting:
    """The weighting ``kind`` with its own parameter (power: p, softmax: t, rank: r0; None: its default). A parameter
    given for another weighting is an error."""
    own = PARAM_NAMES.get(kind)
    if own is None:
        raise BuildError(f"unknown weighting {kind!r}; choose one of {', '.join(PARAM_NAMES)}")
    given = {"p": p, "t": t, "r0": r0}
    for name, value in given.items():
        if value is not None and name != own:
            owner = next(w for w, n in PARAM_NAMES.items() if n == name)
            raise BuildError(f"--{name} is the {owner} weighting's parameter; it does not apply to --weighting {kind}")
    return Weighting.of(kind, given[own])


@dataclass
class BuildConfig:
    pairs: str | Path  # a pairs file, or webdataset/parquet shards (brace pattern or glob)
    images_root: Path | None
    out: Path
    image_encoder: str = "effnet-lite2"
    text_encoder: str = "minilm"
    index_type: str = "auto"
    anchors: str = "caption"
    rerank: str | None = "Flat"
    rerank_factor: float = RERANK_FACTOR
    k: int = DEFAULT_K
    p: float = DEFAULT_P  # the power weighting's p (also the served p of requests asking for power without one)
    weighting: str = "power"  # the served default weighting: power (p), softmax (t) or rank (r0)
    t: float | None = None  # softmax temperature (None: its default)
    r0: float | None = None  # rank offset (None: its default)
    auto: bool = False  # choose k and the weighting from the pairs (held-out images' mrr), over k/p/weighting
    auto_fallback: bool = False  # with auto: too few distinct images keeps k/p/weighting (a note) instead of failing
    batch_size: int = 32
    shard_rows: int = SHARD_ROWS  # rows per shard of a pairs file
    image_column: str | None = None  # parquet: default "jpg"; pairs files: default "image"
    caption_column: str | None = None
    key_column: str = "key"
    decode_workers: int = field(default_factory=default_decode_workers)  # processes; 0 decodes in-process
    ray: str | None = None  # Ray address (or "auto", "local"): embed the shards with Ray Data
    device: str | None = None
    runtime: str | None = None  # where the encoders run: auto | onnx | torch (None: $ASIF_RUNTIME or auto)
    quantize: str = "none"  # none | int8: the image encoder quantised (ONNX Runtime), kept in the index folder
    max_pixels: int = DEFAULT_MAX_PIXELS
    force: bool = False
    seed: int = 0
    store: str = "faiss"  # faiss: an index folder at `out`; milvus: a shared model (`out` keeps the work files)
    milvus_uri: str = "milvus.db"
    milvus_prefix: str = "asif"
    milvus_index: str = "FLAT"

    def default_weighting(self) -> Weighting:
        return weighting_of(self.weighting, self.p if self.weighting == "power" else None, self.t, self.r0)


@dataclass
class BuildReport:
    rows: int = 0  # samples read, with those skipped
    captions: int = 0
    images: int = 0
    pairs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    shards_embedded_now: int = 0
    shards_resumed: int = 0
    images_resumed: int = 0  # distinct images of the resumed shards
    failed_shards: dict[str, str] = field(default_factory=dict)  # shard -> why it was skipped
    images_embedded_now: int = 0
    captions_embedded_now: int = 0
    stages: StageTimes = field(default_factory=StageTimes)  # of the shards embedded by this run
    decode_workers: int = 0
    embed_seconds: float = 0.0  # wall time of the embedding step
    index_seconds: float = 0.0
    total_seconds: float = 0.0
    index: dict[str, Any] = field(default_factory=dict)
    auto: dict[str, Any] = field(default_factory=dict)  # with --auto: the choice (k, weighting, mrr, ...)

    def lines(self) -> list[str]:
        st = self.stages

        def rate(n: int, s: float, unit: str, per: str = "") -> str:
            return f"{n} in {s:.1f} s ({n / s:.1f} {unit}/s{per})" if s > 0 and n else f"{n}"

        skipped = ", ".join(f"{k}={v}" for k, v in self.skipped.items() if v) or "none"
        workers = max(1, self.decode_workers)
        waited = f"; the encoder waited {st.wait_seconds:.1f} s for it" if st.images else ""
        out = [
            f"rows read:         {self.rows}",
            f"captions used:     {self.captions}",
            f"distinct images:   {self.images}",
            f"anchors (pairs):   {self.pairs}",
            f"skipped:           {skipped}",
            f"shards:            {self.shards} ({self.shards_embedded_now} embedded now, {self.shards_resumed} "
            f"resumed, {len(self.failed_shards)} failed)",
        ]
        out += [f"  failed {name}: {why}" for name, why in self.failed_shards.items()]
        out += [
            f"read:              {rate(st.samples, st.read_seconds, 'samples')}",
            f"decode:            {rate(st.images, st.decode_seconds / workers, 'img', f', {workers} workers')}{waited}",
            f"images embedded:   {rate(self.images_embedded_now, st.image_seconds, 'img')}",
            f"captions embedded: {rate(self.captions_embedded_now, st.caption_seconds, 'captions')}",
            f"embedding wall:    {rate(self.images_embedded_now, self.embed_seconds, 'img')}",
            f"index build:       {rate(self.pairs, self.index_seconds, 'pairs')} (image {self.index.get('image')}, "
            f"text {self.index.get('text')})",
            f"total:             {self.total_seconds:.1f} s",
        ]
        if "not_chosen" in self.auto:
            out.insert(-1, f"auto:              not chosen ({self.auto['not_chosen']})")
        elif self.auto:
            chosen = Weighting(**self.auto["weighting"]).describe()
            out.insert(-1, f"auto:              k={self.auto['k']}, {chosen} (held-out mrr {self.auto['mrr']:.3f} "
                       f"over {self.auto['held_out_images']} images x {len(self.auto['seeds'])} splits, "
                       f"{self.auto['seconds']:.1f} s)")  # fmt: skip
        return out


def _fingerprint(config: BuildConfig, kind: str, image_id: dict[str, Any], text_id: dict[str, Any]) -> str:
    """What every shard file depends on beyond its own input (which each file's fingerprint covers)."""
    settings = [
        kind,
        str(Path(config.images_root).resolve()) if config.images_root else None,
        image_id,
        text_id,
        config.max_pixels,
        config.image_column,
        config.caption_column,
        config.key_column,
    ]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _prepare_work_dir(work: Path, fingerprint: str, log: TextIO) -> None:
    state = work / "state.json"
    if work.exists():
        try:
            same = json.loads(state.read_text())["fingerprint"] == fingerprint
        except (OSError, ValueError, KeyError):
            same = False
        if not same:
            print("encoders or settings changed since the interrupted build: starting over", file=log)
            shutil.rmtree(work)
    (work / "shards").mkdir(parents=True, exist_ok=True)
    if not state.exists():
        write_json_atomic(state, {"fingerprint": fingerprint})


def shard_file(work: Path, shard: Shard) -> Path:
    return work / "shards" / (hashlib.sha1(shard.name.encode()).hexdigest()[:20] + ".npz")


def run_build(
    config: BuildConfig,
    image_encoder: ImageEncoder | None = None,
    text_encoder: TextEncoder | None = None,
    log: TextIO = sys.stderr,
    after_shard: Callable[[str], None] | None = None,
) -> BuildReport:
    """Build (or resume building) an index folder, or load a shared model into Milvus (``config.store``).
    ``after_shard(name)`` runs after each shard's embedding file is written (a test hook)."""
    check_k_p(config.k, config.p)
    config.default_weighting()  # a bad weighting fails before any work
    _check_quantize(config)
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


def _check_quantize(config: BuildConfig) -> None:
    try:
        quantize = check_choice(config.quantize)
    except QuantizeError as exc:
        raise BuildError(str(exc)) from None
    if quantize != "none" and (config.store != "faiss" or config.ray):
        raise BuildError("--quantize int8 builds an index folder in this process (not --store milvus, not --ray)")


def _quantize(
    config: BuildConfig,
    options: SourceOptions,
    image_encoder: ImageEncoder,
    shards: list[Shard],
    out: Path,
    log: TextIO,
) -> None:
    """With ``--quantize int8``: the image encoder's int8 graph, calibrated on the first distinct images of the
    shards and kept in the index folder; the image encoder runs on it from here on (its identity records it)."""
    if check_choice(config.quantize) == "none":
        return

    def distinct_images() -> Iterator[bytes | Path]:
        seen: set[str] = set()
        for shard in shards:
            with contextlib.suppress(ShardError):  # the embedding step reports it
                for sample in shard.samples(options, Counter()):
                    if sample.ref not in seen:
                        seen.add(sample.ref)
                        yield sample.image

    t0 = time.perf_counter()
    images = calibration_images(distinct_images())
    try:
        quantize_image_encoder(image_encoder, images, out / QUANTIZED_FILE)
    except QuantizeError as exc:
        raise BuildError(str(exc)) from None
    print(f"image encoder quantised to int8 on {len(images)} images in {time.perf_counter() - t0:.1f} s", file=log)


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
    _quantize(config, options, image_encoder, shards, out, log)
    image_id, text_id = image_encoder.identity.to_dict(), text_encoder.identity.to_dict()
    work = out / WORK_DIR
    _prepare_work_dir(work, _fingerprint(config, kind, image_id, text_id), log)
    todo = []
    for shard in shards:
        meta = stored_meta(shard_file(work, shard))
        if meta is not None and meta["fingerprint"] == shard.fingerprint():
            report.shards_resumed += 1
            report.images_resumed += int(meta.get("times", {}).get("images", 0))
        else:
            todo.append(shard)
    _embed(config, options, todo, work, image_encoder, text_encoder, [image_id, text_id], report, log, after_shard)
    files = [shard_file(work, s) for s in shards if s.name not in report.failed_shards]
    if not files:
        why = "; ".join(f"{n}: {w}" for n, w in report.failed_shards.items()) or "the input has no shards"
        raise BuildError(f"no usable pairs in {config.pairs} ({why})")

    skipped: Counter = Counter(dict.fromkeys(SKIP_REASONS, 0))  # every reason in the report, zero or not
    n_pairs, distinct = _count(files, config.anchors, report, skipped)
    report.skipped = dict(skipped)
    if n_pairs == 0:
        raise BuildError("no anchors: every image was unreadable or every sample was skipped")
    report.pairs = n_pairs
    choice = _auto_choice(config, files, n_pairs, report, log) if config.auto else None
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

    manifest = {
        "image_encoder": image_id,
        "text_encoder": text_id,
        "anchors": config.anchors,
        "defaults": defaults,
        **({"auto": choice.entry()} if choice else {}),
        "next_pair_id": n_pairs,
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
    dims = {"image": image_encoder.dim, "text": text_encoder.dim}
    t0 = time.perf_counter()
    if client is not None:
        chunks = (chunk for _, chunk in anchor_chunks(files, config.anchors))
        index = MilvusIndex.parse(config.milvus_index)
        report.index = load_milvus(client, config.milvus_prefix, index, dims, chunks, n_pairs, manifest, log)
        report.index_seconds = time.perf_counter() - t0
    else:
        _write_folder(config, out, files, dims, n_pairs, distinct, manifest, report, t_start, log)
    shutil.rmtree(work, ignore_errors=True)
    if client is not None:
        with contextlib.suppress(OSError):
            out.rmdir()  # it only held the work files
    report.total_seconds = time.perf_counter() - t_start
    return report


def _auto_choice(
    config: BuildConfig, files: list[Path], n_pairs: int, report: BuildReport, log: TextIO
) -> AutoChoice | None:
    """``--auto``'s choice; None (and why, in the report) when the default choice has too few images."""
    try:
        return auto_select(files, config.anchors, n_pairs, config.seed, log=log)
    except BuildError as exc:
        if not config.auto_fallback or "distinct images" not in str(exc):
            raise
        why = f"{exc}; recorded k={config.k} and {config.default_weighting().describe()}"
        report.auto = {"not_chosen": why}
        return None


def _served_defaults(k: int, weighting: Weighting, p: float) -> dict[str, Any]:
    """The manifest's defaults: k, the weighting, and p (the weighting's when it is power, else ``p``: what a request
    asking for the power weighting without its p gets)."""
    served_p = weighting.param if weighting.kind == "power" else float(p)
    return {"k": int(k), "p": served_p, "weighting": weighting.to_dict()}


def _embed(
    config: BuildConfig,
    options: SourceOptions,
    todo: list[Shard],
    work: Path,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    identity: list[dict[str, Any]],
    report: BuildReport,
    log: TextIO,
    after_shard: Callable[[str], None] | None,
) -> None:
    """Embed the shards not embedded yet, writing one file per shard as each finishes."""
    by_name = {s.name: s for s in todo}
    progress = Progress(report.shards, report.shards_resumed, report.images_resumed, log)
    t0 = time.perf_counter()

    def finished(name: str, emb: ShardEmbedding | None, data: bytes | None, problem: str) -> None:
        if problem:
            print(f"skipping shard {problem}", file=log)
            report.failed_shards[name] = problem
        else:
            if emb is None:
                assert data is not None
                write_atomic(shard_file(work, by_name[name]), data)
                emb = ShardEmbedding.from_file(shard_file(work, by_name[name]))
            else:
                write_atomic(shard_file(work, by_name[name]), emb.to_bytes())
            report.stages.add(emb.times)
            report.shards_embedded_now += 1
            report.images_embedded_now += emb.times.images
            report.captions_embedded_now += emb.times.captions
        progress.shard_done(emb.times.images if emb is not None else 0)
        if after_shard is not None:
            after_shard(name)

    try:
        if config.ray:
            from index_builder.ray_embed import embed_with_ray

            report.decode_workers = 1
            embed_with_ray(
                config.ray, todo, options, config.image_encoder, config.text_encoder, identity, config.device,
                config.batch_size, config.max_pixels,
                lambda name, data, problem: finished(name, None, data, problem), log, runtime=config.runtime,
            )  # fmt: skip
        else:
            report.decode_workers = config.decode_workers
            # the workers decode, thumbnail and prepare; this process runs the encoder's network only
            decoder = Decoder(config.decode_workers if todo else 0, config.max_pixels, image_encoder.preparer())
            with decoder:
                for shard in todo:
                    try:
                        emb = embed_shard(
                            shard, options, image_encoder, text_encoder, decoder, config.batch_size,
                            on_images=progress.images,
                        )  # fmt: skip
                    except ShardError as exc:
                        finished(shard.name, None, None, str(exc))
                        continue
                    finished(shard.name, emb, None, "")
    finally:
        progress.close()
        report.embed_seconds = time.perf_counter() - t0


class Progress:
    """The embedding step's progress bar: images embedded so far (those of resumed shards included), moved after
    every encoder batch, with tqdm's img/s and the shards done out of all in the postfix.

    A shard embedded elsewhere (Ray) moves the bar by its images when its file arrives."""

    def __init__(self, shards: int, resumed: int, resumed_images: int, file: TextIO) -> None:
        self.shards, self.done, self.in_shard = shards, resumed, 0
        self.bar = tqdm(initial=resumed_images, desc="embedding", unit="img", file=file, postfix=self._shards())

    def _shards(self) -> str:
        return f"{self.done}/{self.shards} shards"

    def images(self, n: int) -> None:
        self.in_shard += n
        self.bar.update(n)

    def shard_done(self, images: int) -> None:
        """A shard finished (or failed: ``images`` 0) with ``images`` images, some perhaps counted already."""
        self.done += 1
        self.bar.set_postfix_str(self._shards(), refresh=False)
        self.bar.update(max(0, images - self.in_shard))
        self.bar.refresh()
        self.in_shard = 0

    def close(self) -> None:
        self.bar.close()


def _count(files: list[Path], mode: str, report: BuildReport, skipped: Counter) -> tuple[int, dict[str, int]]:
    """Pairs and distinct vectors per role over all shard files; fills the report's counts."""
    n = 0
    distinct = {"image": 0, "text": 0}
    for emb, chunk in anchor_chunks(files, mode):
        skipped.update(emb.counts)
        report.rows += len(emb.captions) + sum(emb.counts.values())
        usable = emb.image_ok[emb.sample_image] if len(emb.sample_image) else np.zeros(0, bool)
        skipped["unreadable_images"] += int((~emb.image_ok).sum())
        skipped["captions_of_unreadable_images"] += int((~usable).sum())
        report.captions += int(usable.sum())
        report.images += int(emb.image_ok.sum())
        n += len(chunk.pairs)
        for role, vecs in chunk.vectors.items():
            distinct[role] += count_distinct_rows(vecs)  # within a shard: stores group duplicates per add
    return n, distinct


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


def _write_folder(
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
