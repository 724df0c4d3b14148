"""Batch balancing (``"balance": true``, :class:`asif.math.variants.Balance`) on whole test sets, over the
served weightings.

    python bench/balance.py                        # effnet-lite0 with MiniLM and mpnet, Imagenette val and CIFAR-10

All 40,450 Flickr8k pairs as per-caption anchors (embeddings from the eval cache, computed once). For each test set,
the exact top-1 of the paper's k=800, p=8, of what ``asif build`` now chooses by default for these pairs (``--auto``;
the pick is recomputed here with :func:`asif.tuning.autoselect.auto_kp`), and of each of them with the whole test set
balanced to a uniform class prior at temperatures 0.005-0.05 (the served default is 0.01). The test set is one
batch, as an ``asif eval`` run or a folder sorted in one request would be. Results go to
``bench/balance_results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.build_shards import SHARED, print_table  # noqa: E402

TEMPERATURES = (0.005, 0.01, 0.02, 0.05)
TESTS = {"imagenette": ("imagenette/val", "imagenette/classes.tsv"), "cifar10": ("cifar10/test", None)}


@dataclass
class TestRun:
    """One test set's embedded images, their classes and the class embeddings (the 7 default templates)."""

    name: str
    images: np.ndarray
    truth: np.ndarray
    labels: np.ndarray


def development_runs(text_encoder: str, image_encoder: str) -> tuple[np.ndarray, np.ndarray, list[TestRun]]:
    """(image anchors, caption anchors, test runs): all Flickr8k pairs as per-caption anchors and each test set of
    TESTS, embedded by the given encoders (from the evaluation's embedding cache; computed once)."""
    from asif.encoders import load_image_encoder, load_text_encoder
    from asif.encoders.embcache import EmbeddingCache
    from asif.serving.labels import DEFAULT_TEMPLATES, LabelSet, combine_prompt_embeddings
    from evaluation.config import EvalConfig
    from evaluation.data import load_test_set
    from evaluation.embed import anchors_from_pairs, embed_image_files

    img_enc = load_image_encoder(image_encoder, "cpu", 32, "onnx")
    txt_enc = load_text_encoder(text_encoder, "cpu", 32, "onnx")
    img_cache, txt_cache = EmbeddingCache(img_enc.identity), EmbeddingCache(txt_enc.identity)
    cfg = EvalConfig(
        test=SHARED, out=Path("."), pairs=SHARED / "flickr8k" / "captions.csv",
        images_root=SHARED / "flickr8k" / "images", image_encoder=image_encoder, text_encoder=text_encoder,
    )  # fmt: skip
    anchors = anchors_from_pairs(cfg, img_enc, txt_enc, img_cache, txt_cache)["caption"]
    tests = []
    for test, (folder, classes) in TESTS.items():
        data = load_test_set(SHARED / folder, SHARED / classes if classes else None)
        emb, ok = embed_image_files(data.files, img_enc, img_cache, test, 32)
        prompts = txt_enc.encode(LabelSet(tuple(data.names), DEFAULT_TEMPLATES).prompts())
        labels = combine_prompt_embeddings(prompts, len(data.names))
        tests.append(TestRun(test, emb[ok], np.asarray(data.labels)[ok], labels))
    return anchors.image, anchors.text, tests


def run(text_encoder: str, image_encoder: str) -> list[dict]:
    from asif.math.relrep import Weighting
    from asif.math.variants import prior_balanced
    from asif.tuning.autoselect import auto_kp
    from asif.tuning.metrics import DenseSweep

    image_anchors, text_anchors, tests = development_runs(text_encoder, image_encoder)
    auto = auto_kp(image_anchors, text_anchors)
    settings = {"paper 800, p=8": (800, Weighting("power", 8.0)), f"auto {auto.k}, {auto.weighting.describe()}": (
        auto.k, auto.weighting)}  # fmt: skip
    rows = []
    for test in tests:
        k_max = max(k for k, _ in settings.values())
        sweep = DenseSweep(test.images, test.labels, image_anchors, text_anchors, k_max)
        for name, (k, weighting) in settings.items():
            scores = sweep.scores(k, weighting)
            row = {"text": text_encoder, "test": test.name, "setting": name}
            row["top1"] = round(100 * float((scores.argmax(axis=1) == test.truth).mean()), 1)
            for t in TEMPERATURES:
                balanced = prior_balanced(scores, t).argmax(axis=1)
                row[f"balanced t={t:g}"] = round(100 * float((balanced == test.truth).mean()), 1)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-encoder", default="effnet-lite0")
    ap.add_argument("--text-encoders", default="minilm,mpnet")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "balance_results.json")
    args = ap.parse_args()
    rows = [row for text in args.text_encoders.split(",") for row in run(text, args.image_encoder)]
    print_table(rows, list(rows[0]))
    record = {"image_encoder": args.image_encoder, "anchors": "Flickr8k captions (40,450)", "rows": rows}
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
