"""The evaluation's embeddings, through its cache: image files (or a view of them), texts, and the anchors of a
pairs file in each anchor mode."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from asif.encoders import ImageEncoder, TextEncoder
from asif.encoders.augment import image_view
from asif.encoders.embcache import EmbeddingCache, file_key, text_key
from asif.encoders.images import ImageError, open_image
from asif.math.anchors import ANCHOR_MODES, form_anchors
from evaluation.config import EvalConfig
from index_builder.pairs_io import read_pairs, resolve_image


def embed_image_files(
    files: list[Path], encoder: ImageEncoder, cache: EmbeddingCache, desc: str, batch: int, view: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, readable mask); unreadable files get a zero row and False. ``view``: embed that view of each
    image instead (:mod:`asif.encoders.augment`), cached under its own keys."""
    suffix = f"#view={view}" if view else ""
    keys = [file_key(f) + suffix if f.is_file() else f"missing:{f}" for f in files]
    ok = np.array([f.is_file() for f in files])
    bar = tqdm(total=len(files), desc=desc, unit="img", file=sys.stderr)

    def compute(idx: list[int]) -> np.ndarray:
        out = np.zeros((len(idx), encoder.dim), dtype=np.float32)
        imgs, where = [], []
        for j, i in enumerate(idx):
            try:
                image = open_image(files[i])
                imgs.append(image_view(image, view) if view else image)
                where.append(j)
            except ImageError:
                ok[i] = False
        for s in range(0, len(imgs), batch):
            out[where[s : s + batch]] = encoder.encode(imgs[s : s + batch])
        return out

    emb = cache.embed(keys, compute, chunk=batch * 8, progress=bar.update)
    bar.close()
    ok &= np.linalg.norm(emb, axis=1) > 0
    return emb, ok


def embed_texts(texts: list[str], encoder: TextEncoder, cache: EmbeddingCache, desc: str) -> np.ndarray:
    bar = tqdm(total=len(texts), desc=desc, unit="txt", file=sys.stderr)
    emb = cache.embed(
        [text_key(t) for t in texts], lambda idx: encoder.encode([texts[i] for i in idx]), 1024, bar.update
    )
    bar.close()
    return emb


@dataclass
class AnchorSet:
    image: np.ndarray
    text: np.ndarray
    image_files: list[Path]


def anchors_from_pairs(
    cfg: EvalConfig, img_enc: ImageEncoder, txt_enc: TextEncoder, img_cache: EmbeddingCache, txt_cache: EmbeddingCache
) -> dict[str, AnchorSet]:
    assert cfg.pairs is not None and cfg.images_root is not None
    rows = read_pairs(cfg.pairs).rows
    index: dict[str, int] = {}
    files: list[Path] = []
    row_image, captions = [], []
    for ref, caption in rows:
        if ref not in index:
            path = resolve_image(Path(cfg.images_root), ref)
            if path is None:
                continue
            index[ref] = len(files)
            files.append(path)
        row_image.append(index[ref])
        captions.append(caption)
    img_emb, ok = embed_image_files(files, img_enc, img_cache, "pair images", cfg.batch_size)
    cap_emb = embed_texts(captions, txt_enc, txt_cache, "captions")
    out = {}
    for mode in ANCHOR_MODES:
        iv, tv, meta = form_anchors(mode, np.asarray(row_image), cap_emb, img_emb, ok, captions)
        out[mode] = AnchorSet(iv, tv, [files[i] for i, _ in meta])
    return out
