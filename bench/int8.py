"""int8 image encoder against float: speed of the network, and what it does to ASIF's zero-shot predictions.

    python bench/int8.py                       # effnet-lite0 + MiniLM, Flickr8k anchors, Imagenette val and CIFAR-10

1. The encoder's network alone on real Flickr8k photos (prepared beforehand), float and int8 under ONNX Runtime, at
   batch 1 and 32 (ms per image, best of 3 timed stretches), and the cosine between their embeddings.
2. ``asif eval --pairs`` (all of Flickr8k as caption anchors, k=800, p=8) on each test set, once with the float
   encoder and once with ``--quantize int8`` (calibrated on the first 256 anchor images): top-1 of each, and the
   share of test images whose predicted class is the same (agreement).

The default-gate of issue 26: int8 may become the default only if, on both test sets, agreement >= 99.5% and the
top-1 is within 0.3 points of float. Results go to ``bench/int8_results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.build_shards import SHARED, print_table  # noqa: E402

GATE_AGREEMENT, GATE_TOP1_POINTS = 0.995, 0.3
TESTS = {"imagenette": ("imagenette/val", "imagenette/classes.tsv"), "cifar10": ("cifar10/test", None)}


def ms_per_image(forward, pixels: np.ndarray, batch: int, seconds: float = 2.0) -> float:
    forward({"pixels": pixels[:batch]})
    best = float("inf")
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            forward({"pixels": pixels[:batch]})
            n += batch
        best = min(best, (time.perf_counter() - t0) / n * 1000)
    return round(best, 2)


def encoder_floor(image_encoder: str, work: Path) -> dict:
    from asif.encoders import load_image_encoder
    from asif.encoders.images import open_image
    from asif.encoders.quantize import calibration_images, quantize_image_encoder

    photos = sorted((SHARED / "flickr8k" / "images").glob("*.jpg"))
    fp32 = load_image_encoder(image_encoder, "cpu", 32, "onnx")
    int8 = load_image_encoder(image_encoder, "cpu", 32, "onnx")
    quantize_image_encoder(int8, calibration_images(photos), work / "int8.onnx")
    held_out = [open_image(p) for p in photos[-256:]]  # not among the calibration images
    pixels = np.stack([fp32.prepare(im) for im in held_out[:64]])
    a, b = fp32.encode(held_out), int8.encode(held_out)
    cos = np.sum(a * b, axis=1)
    out = {"cosine_mean": round(float(cos.mean()), 4), "cosine_min": round(float(cos.min()), 4)}
    for name, enc in (("float", fp32), ("int8", int8)):
        for batch in (1, 32):
            out[f"{name}_batch{batch}_ms"] = ms_per_image(enc.forward, pixels, batch)  # type: ignore[attr-defined]
    return out


def agreement(test: str, image_encoder: str, text_encoder: str, work: Path) -> dict:
    from evaluation.config import EvalConfig
    from evaluation.run import run_eval

    folder, classes = TESTS[test]
    reports = {}
    for quantize in ("none", "int8"):
        cfg = EvalConfig(
            test=SHARED / folder,
            out=work / f"{test}-{quantize}",
            pairs=SHARED / "flickr8k" / "captions.csv",
            images_root=SHARED / "flickr8k" / "images",
            image_encoder=image_encoder,
            text_encoder=text_encoder,
            classes=SHARED / classes if classes else None,
            ks=[800],
            ps=[8.0],
            sizes=[],
            runtime="onnx",
            quantize=quantize,
        )
        reports[quantize] = run_eval(cfg)
    a, b = (np.asarray(reports[q]["predictions"]) for q in ("none", "int8"))
    top1 = {q: float(reports[q]["metrics"]["top1"]) for q in ("none", "int8")}
    agree = float((a == b).mean())
    points = round(100 * (top1["int8"] - top1["none"]), 2)
    return {
        "test": test,
        "images": len(a),
        "top1_float": round(100 * top1["none"], 2),
        "top1_int8": round(100 * top1["int8"], 2),
        "top1_points": points,
        "agreement": round(100 * agree, 2),
        "gate_met": agree >= GATE_AGREEMENT and abs(points) <= GATE_TOP1_POINTS,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-encoder", default="effnet-lite0")
    ap.add_argument("--text-encoder", default="minilm")
    ap.add_argument("--tests", default="imagenette,cifar10")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "int8_results.json")
    args = ap.parse_args()
    if not (SHARED / "flickr8k" / "captions.csv").is_file():
        raise SystemExit(f"no Flickr8k under {SHARED} (set ASIF_SHARED_DATA)")
    with tempfile.TemporaryDirectory(prefix="asif-int8-") as tmp:
        work = Path(tmp)
        floor = encoder_floor(args.image_encoder, work)
        print_table([floor], list(floor))
        rows = [agreement(t, args.image_encoder, args.text_encoder, work) for t in args.tests.split(",")]
    print_table(rows, list(rows[0]))
    record = {
        "cpus": os.cpu_count(),
        "image_encoder": args.image_encoder,
        "text_encoder": args.text_encoder,
        "anchors": "Flickr8k captions (40,450), k=800, p=8",
        "encoder": floor,
        "eval": rows,
        "gate": f"agreement >= {100 * GATE_AGREEMENT}% and |top-1 change| <= {GATE_TOP1_POINTS} points on every test",
        "int8_may_be_default": all(r["gate_met"] for r in rows),
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
