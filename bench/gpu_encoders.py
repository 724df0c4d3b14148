"""Image encoders on a CUDA machine: torch on the GPU (what `--runtime auto` picks there) against ONNX Runtime.

    python bench/gpu_encoders.py --json out.json      # on a machine with a GPU; effnet packages importable

Prints a table (ms per image at batch 1, 32 and 128, random pixels: the network alone) and writes JSON. ONNX Runtime
runs on the CPU provider unless the installed onnxruntime has a CUDA provider; `--runtime onnx --device cuda`
without one falls back to torch with a warning, which the table shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asif.encoders import RuntimeOptions, load_image_encoder

BATCHES = (1, 32, 128)


def ms_per_image(encoder, batch: int, seconds: float = 3.0) -> float:
    size = encoder.image_size
    x = [np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)] * batch
    encoder.encode_prepared(x)  # warm-up (CUDA kernels, ORT arena)
    encoder.encode_prepared(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        encoder.encode_prepared(x)
        n += batch
    return (time.perf_counter() - t0) / n * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--specs", default="effnet-lite0,effnet-lite2")
    args = parser.parse_args()
    import onnxruntime
    import torch

    rows = []
    for spec in args.specs.split(","):
        for device, runtime in (("cuda", "torch"), ("cuda", "onnx"), ("cpu", "onnx"), ("cpu", "torch")):
            if device == "cuda" and not torch.cuda.is_available():
                continue
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                enc = load_image_encoder(spec, device, 32, RuntimeOptions(runtime=runtime))
            row = {
                "spec": spec,
                "device": device,
                "asked": runtime,
                "ran": enc.runtime,
                "warning": next((str(w.message) for w in caught if w.category is RuntimeWarning), None),
            }
            for b in BATCHES:
                row[f"b{b}_ms"] = round(ms_per_image(enc, b), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| encoder | device | runtime asked -> ran | " + " | ".join(f"batch {b} ms/img" for b in BATCHES) + " |")
    print("|---|---|---|" + "---|" * len(BATCHES))
    for r in rows:
        cells = " | ".join(f"{r[f'b{b}_ms']:.2f}" for b in BATCHES)
        print(f"| {r['spec']} | {r['device']} | {r['asked']} -> {r['ran']} | {cells} |")
    info = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
