"""`asif build`: embed image-caption pairs once and write a servable index folder.

Steps: read the pairs file; embed each distinct image once and every caption, in chunks
written to ``<out>/.build/`` (so an interrupted build resumes where it stopped); form the
anchors; train and fill the two FAISS indices; write metadata, indices and manifest through
:mod:`asif.persist` (manifest last: the folder is never half-written).

Anchors (``--anchors``):

- ``caption`` (default): one anchor per caption; the image embedding is repeated for each caption
  (Flickr8k: 40,450 anchors). Measured better at the default k=800, p=8 (README, Evaluation).
- ``image``: one anchor per image; its text side is the L2-normalised mean of its captions'
  embeddings (Flickr8k: 8,090 anchors from 40,450 captions): 5x smaller, as good at its best k, p.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image
from tqdm import tqdm

from asif.anchors import ANCHOR_MODES, form_anchors
from asif.encoders import ImageEncoder, TextEncoder, load_image_encoder, load_text_encoder
from asif.images import DEFAULT_MAX_PIXELS, ImageError, open_image, thumbnail_jpeg
from asif.metadata import PairMetadata
from asif.persist import MANIFEST, read_manifest, save_index_folder, write_json_atomic
from asif.relrep import DEFAULT_K, DEFAULT_P, check_k_p
from asif.stores import RERANK_FACTOR, build_store, choose_index_spec, count_distinct_rows
from asif.stores.milvus_store import MilvusIndex
from index_builder.errors import AlreadyBuiltError, BuildError
from index_builder.milvus_out import check_target, load_milvus, open_client
from index_builder.pairs_io import read_pairs, resolve_image

WORK_DIR = ".build"


@dataclass
class BuildConfig:
    pairs: Path
    images_root: Path
    out: Path
    image_encoder: str = "effnet-lite2"
    text_encoder: str = "minilm"
    index_type: str = "auto"
    anchors: str = "caption"
    rerank: str | None = "Flat"
    rerank_factor: float = RERANK_FACTOR
    k: int = DEFAULT_K
    p: float = DEFAULT_P
    batch_size: int = 32
    image_chunk: int = 512
    caption_chunk: int = 4096
    device: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    force: bool = False
    seed: int = 0
    store: str = "faiss"  # faiss: an index folder at `out`; milvus: a shared model (`out` keeps the work chunks)
    milvus_uri: str = "milvus.db"
    milvus_prefix: str = "asif"
    milvus_index: str = "FLAT"


@dataclass
class BuildReport:
    rows: int = 0
    captions: int = 0
    images: int = 0
    pairs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    images_embedded_now: int = 0
    captions_embedded_now: int = 0
    image_seconds: float = 0.0
    caption_seconds: float = 0.0
    index_seconds: float = 0.0
    total_seconds: float = 0.0
    resumed_chunks: int = 0
    index: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        def rate(n: int, s: float, unit: str) -> str:
            return f"{n} in {s:.1f} s ({n / s:.1f} {unit}/s)" if s > 0 and n else f"{n} (from resumed chunks)"

        skipped = ", ".join(f"{k}={v}" for k, v in self.skipped.items()) or "none"
        return [
            f"rows read:         {self.rows}",
            f"captions used:     {self.captions}",
            f"distinct images:   {self.images}",
            f"anchors (pairs):   {self.pairs}",
            f"skipped:           {skipped}",
            f"images embedded:   {rate(self.images_embedded_now, self.image_seconds, 'img')}",
            f"captions embedded: {rate(self.captions_embedded_now, self.caption_seconds, 'captions')}",
            f"resumed chunks:    {self.resumed_chunks}",
            f"index build:       {self.index_seconds:.1f} s (image {self.index.get('image')}, "
            f"text {self.index.get('text')})",
            f"total:             {self.total_seconds:.1f} s",
        ]


def _fingerprint(config: BuildConfig, image_id: dict[str, Any], text_id: dict[str, Any]) -> str:
    h = hashlib.sha256()
    with open(config.pairs, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    h.update(
        json.dumps(
            [
                str(config.images_root.resolve()),
                image_id,
                text_id,
                config.image_chunk,
                config.caption_chunk,
                config.max_pixels,
            ],
            sort_keys=True,
        ).encode()
    )
    return h.hexdigest()


def _prepare_work_dir(work: Path, fingerprint: str, log: TextIO) -> None:
    state = work / "state.json"
    if work.exists():
        try:
            same = json.loads(state.read_text())["fingerprint"] == fingerprint
        except (OSError, ValueError, KeyError):
            same = False
        if not same:
            print("inputs or encoders changed since the interrupted build: starting over", file=log)
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not state.exists():
        write_json_atomic(state, {"fingerprint": fingerprint})


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _load_image(path: Path, max_pixels: int) -> tuple[Image.Image | None, bytes]:
    """(RGB image, thumbnail JPEG), or (None, b"") when the file is unreadable."""
    try:
        img = open_image(path, max_pixels=max_pixels)
    except ImageError:
        return None, b""
    return img, thumbnail_jpeg(img)


def _chunks(n: int, size: int) -> Iterator[tuple[int, int, int]]:
    for c, start in enumerate(range(0, n, size)):
        yield c, start, min(n, start + size)


def embed_images(
    paths: Sequence[Path], encoder: ImageEncoder, work: Path, config: BuildConfig, report: BuildReport
) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """Embed images in resumable chunks; returns (embeddings, ok mask, thumbnails)."""
    n = len(paths)
    emb = np.zeros((n, encoder.dim), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    thumbs: list[bytes] = [b""] * n
    todo = []
    for c, start, end in _chunks(n, config.image_chunk):
        f = work / f"images-{c:05d}.npz"
        if f.exists():
            with np.load(f) as z:
                emb[start:end], ok[start:end] = z["emb"], z["ok"]
                offs, blob = z["offs"], z["thumbs"].tobytes()
            thumbs[start:end] = [blob[offs[i] : offs[i + 1]] for i in range(end - start)]
            report.resumed_chunks += 1
        else:
            todo.append((c, start, end))
    bar = tqdm(total=n, initial=n - sum(e - s for _, s, e in todo), desc="images", unit="img", file=sys.stderr)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:

        def submit(chunk: tuple[int, int, int]) -> list[Future]:
            return [pool.submit(_load_image, paths[i], config.max_pixels) for i in range(chunk[1], chunk[2])]

        pending = submit(todo[0]) if todo else []
        for j, (c, start, end) in enumerate(todo):
            loaded = [f.result() for f in pending]
            pending = submit(todo[j + 1]) if j + 1 < len(todo) else []  # decode ahead while encoding
            good = [i for i, (img, _) in enumerate(loaded) if img is not None]
            chunk_emb = np.zeros((end - start, encoder.dim), dtype=np.float32)
            for b in range(0, len(good), config.batch_size):
                batch = good[b : b + config.batch_size]
                chunk_emb[batch] = encoder.encode([loaded[i][0] for i in batch])
                bar.update(len(batch))
            bar.update(end - start - len(good))
            chunk_ok = np.zeros(end - start, dtype=bool)
            chunk_ok[good] = True
            chunk_thumbs = [t for _, t in loaded]
            offs = np.cumsum([0] + [len(t) for t in chunk_thumbs]).astype(np.int64)
            _save_npz_atomic(
                work / f"images-{c:05d}.npz",
                emb=chunk_emb,
                ok=chunk_ok,
                offs=offs,
                thumbs=np.frombuffer(b"".join(chunk_thumbs), dtype=np.uint8),
            )
            emb[start:end], ok[start:end], thumbs[start:end] = chunk_emb, chunk_ok, chunk_thumbs
            report.images_embedded_now += end - start
    bar.close()
    report.image_seconds = time.perf_counter() - t0
    return emb, ok, thumbs


def embed_captions(
    captions: Sequence[str], encoder: TextEncoder, work: Path, config: BuildConfig, report: BuildReport
) -> np.ndarray:
    n = len(captions)
    emb = np.zeros((n, encoder.dim), dtype=np.float32)
    chunks = list(_chunks(n, config.caption_chunk))
    done = [c for c in chunks if (work / f"captions-{c[0]:05d}.npy").exists()]
    bar = tqdm(total=n, initial=sum(e - s for _, s, e in done), desc="captions", unit="cap", file=sys.stderr)
    t0 = time.perf_counter()
    for c, start, end in chunks:
        f = work / f"captions-{c:05d}.npy"
        if f.exists():
            emb[start:end] = np.load(f)
            report.resumed_chunks += 1
            continue
        for b in range(start, end, config.batch_size * 4):
            stop = min(end, b + config.batch_size * 4)
            emb[b:stop] = encoder.encode(list(captions[b:stop]))
            bar.update(stop - b)
        tmp = f.with_name(f.name + ".tmp.npy")
        np.save(tmp, emb[start:end])
        tmp.replace(f)
        report.captions_embedded_now += end - start
    bar.close()
    report.caption_seconds = time.perf_counter() - t0
    return emb


def run_build(
    config: BuildConfig,
    image_encoder: ImageEncoder | None = None,
    text_encoder: TextEncoder | None = None,
    log: TextIO = sys.stderr,
    after_images: Callable[[], None] | None = None,
) -> BuildReport:
    """Build (or resume building) an index folder, or load a shared model into Milvus (``config.store``).
    ``after_images`` is a test hook."""
    check_k_p(config.k, config.p)
    if config.store == "faiss":
        if (Path(config.out) / MANIFEST).exists() and not config.force:
            raise AlreadyBuiltError(f"{config.out} already holds an index; pass --force to rebuild it")
        return _build(config, None, image_encoder, text_encoder, log, after_images)
    if config.store != "milvus":
        raise BuildError(f"unknown store {config.store!r}; choose faiss or milvus")
    MilvusIndex.parse(config.milvus_index)  # a bad spec fails before any work
    client = open_client(config.milvus_uri)
    try:
        check_target(client, config.milvus_prefix, config.force)
        return _build(config, client, image_encoder, text_encoder, log, after_images)
    finally:
        client.close()


def _build(
    config: BuildConfig,
    client: Any,
    image_encoder: ImageEncoder | None,
    text_encoder: TextEncoder | None,
    log: TextIO,
    after_images: Callable[[], None] | None,
) -> BuildReport:
    t_start = time.perf_counter()
    out = Path(config.out)
    if not Path(config.images_root).is_dir():
        raise BuildError(f"images root is not a directory: {config.images_root}")
    if config.anchors not in ANCHOR_MODES:
        raise BuildError(f"unknown anchor mode {config.anchors!r}; choose one of {ANCHOR_MODES}")
    pairs = read_pairs(config.pairs)
    report = BuildReport(rows=len(pairs.rows) + pairs.empty_captions + len(pairs.bad_lines))
    report.skipped = {"empty_captions": pairs.empty_captions, "bad_lines": len(pairs.bad_lines)}

    root = Path(config.images_root)
    image_index: dict[str, int] = {}
    image_paths: list[Path] = []
    row_image: list[int] = []
    captions: list[str] = []
    unsafe = 0
    for ref, caption in pairs.rows:
        if ref not in image_index:
            path = resolve_image(root, ref)
            if path is None:
                unsafe += 1
                continue
            image_index[ref] = len(image_paths)
            image_paths.append(path)
        row_image.append(image_index[ref])
        captions.append(caption)
    report.skipped["unsafe_paths"] = unsafe
    if not captions:
        raise BuildError(f"no usable pairs in {config.pairs}")
    image_refs = list(image_index)

    if image_encoder is None or text_encoder is None:
        print(f"loading encoders {config.image_encoder!r} and {config.text_encoder!r}", file=log)
    image_encoder = image_encoder or load_image_encoder(config.image_encoder, config.device, config.batch_size)
    text_encoder = text_encoder or load_text_encoder(config.text_encoder, config.device, config.batch_size)
    image_id, text_id = image_encoder.identity.to_dict(), text_encoder.identity.to_dict()

    out.mkdir(parents=True, exist_ok=True)
    work = out / WORK_DIR
    _prepare_work_dir(work, _fingerprint(config, image_id, text_id), log)

    image_emb, image_ok, thumbs = embed_images(image_paths, image_encoder, work, config, report)
    if after_images is not None:
        after_images()
    caption_emb = embed_captions(captions, text_encoder, work, config, report)

    row_image_arr = np.asarray(row_image, dtype=np.int64)
    report.skipped["unreadable_images"] = int((~image_ok).sum())
    report.skipped["captions_of_unreadable_images"] = int((~image_ok[row_image_arr]).sum())
    img_vecs, txt_vecs, anchor_meta = form_anchors(
        config.anchors, row_image_arr, caption_emb, image_emb, image_ok, captions
    )
    if len(anchor_meta) == 0:
        raise BuildError("no anchors: every image was unreadable")
    report.captions = int(image_ok[row_image_arr].sum())
    report.images = int(image_ok.sum())
    report.pairs = len(anchor_meta)

    manifest = {
        "image_encoder": image_id,
        "text_encoder": text_id,
        "anchors": config.anchors,
        "defaults": {"k": config.k, "p": config.p},
        "next_pair_id": len(anchor_meta),
        "counts": {
            "pairs": report.pairs,
            "rows": report.rows,
            "captions": report.captions,
            "images": report.images,
            "skipped": report.skipped,
        },
        "build": {"pairs_file": str(config.pairs), "images_root": str(config.images_root)},
    }
    t0 = time.perf_counter()
    vectors = {"image": img_vecs, "text": txt_vecs}
    if client is not None:
        first: dict[int, int] = {}  # one thumbnail per image: on its first pair
        for i, (img, _) in enumerate(anchor_meta):
            first.setdefault(img, i)
        rows = [(image_refs[img], caps, thumbs[img] if first[img] == i else None)
                for i, (img, caps) in enumerate(anchor_meta)]  # fmt: skip
        index = MilvusIndex.parse(config.milvus_index)
        report.index = load_milvus(client, config.milvus_prefix, index, vectors, rows, manifest, log)
        report.index_seconds = time.perf_counter() - t0
    else:
        _write_folder(config, out, vectors, anchor_meta, image_refs, thumbs, manifest, report, t_start, log)
    shutil.rmtree(work, ignore_errors=True)
    if client is not None:
        with contextlib.suppress(OSError):
            out.rmdir()  # it only held the work chunks
    report.total_seconds = time.perf_counter() - t_start
    return report


def _write_folder(
    config: BuildConfig,
    out: Path,
    vectors: dict[str, np.ndarray],
    anchor_meta: Sequence[tuple[int, list[str]]],
    image_refs: list[str],
    thumbs: list[bytes],
    manifest: dict[str, Any],
    report: BuildReport,
    t_start: float,
    log: TextIO,
) -> None:
    """Train and fill the two FAISS stores and write the index folder (manifest last)."""
    t0 = time.perf_counter()
    ids = np.arange(len(anchor_meta), dtype=np.int64)
    stores = {}
    for role, vecs in vectors.items():
        spec = choose_index_spec(
            len(vecs),
            vecs.shape[1],
            config.index_type,
            refine=config.rerank,
            rerank_factor=config.rerank_factor,
            distinct=count_distinct_rows(vecs),
        )
        print(f"building {role} index {spec.factory} over {len(vecs)} anchors", file=log)
        stores[role] = build_store(vecs, ids, spec, seed=config.seed)
        report.index[role] = spec.factory
    report.index_seconds = time.perf_counter() - t0

    metadata_name = f"pairs-{secrets.token_hex(4)}.sqlite"
    metadata = PairMetadata(out / metadata_name)
    try:
        metadata.insert_pairs((int(i), image_refs[img], caps) for i, (img, caps) in zip(ids, anchor_meta, strict=True))
        used = sorted({img for img, _ in anchor_meta})
        metadata.insert_thumbnails((image_refs[i], thumbs[i]) for i in used if thumbs[i])
        metadata.set_meta("next_pair_id", str(len(ids)))
    finally:
        metadata.close()

    report.total_seconds = time.perf_counter() - t_start
    build = {**manifest["build"], "seconds": round(report.total_seconds, 1), "report": asdict(report)}
    manifest = {**manifest, "metadata": metadata_name, "build": build}
    save_index_folder(out, stores["image"], stores["text"], manifest)
    for stale in out.glob("pairs-*.sqlite*"):
        if not stale.name.startswith(metadata_name):
            stale.unlink(missing_ok=True)
    read_manifest(out)  # the committed folder reads back
