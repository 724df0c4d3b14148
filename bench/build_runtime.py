"""`asif build` on ONNX Runtime (float, and int8) against torch: the same Flickr8k pairs built once with each.

    python bench/build_runtime.py                      # all of Flickr8k: 40,450 captions, 8,090 images
    python bench/build_runtime.py --limit 5000         # the first 5,000 rows of captions.csv (1,000 images)

Each build runs in its own process (``bench/build_shards.py``'s runner) with the same encoders (default effnet-lite0
and MiniLM), batch size and decode workers; only ``--runtime`` differs, and ``--quantize int8`` for ``onnx+int8``.
Before the builds the encoders are exported to the ONNX cache (once per machine) and the images are read once, so no
build pays a one-time cost another does not. Reported per build: the image encoder's images/s (its busy time), the
embedding step's images/s (wall, captions included), captions/s, the seconds the image encoder waited for the decode
workers, and the build's total seconds; then each variant / torch. Results go to
``bench/build_runtime_results.json``.

On a shared machine other processes take cores from a build: each build waits (up to ``--quiet-wait`` s) for a
quiet moment and records the cores other processes used while it ran (``others_cores``; ~0 for a fair comparison).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.build_shards import SHARED, print_table, run_one  # noqa: E402

VARIANTS = {"torch": ("torch", "none"), "onnx": ("onnx", "none"), "onnx+int8": ("onnx", "int8")}
RATES = ("encode_img_per_s", "images_per_s_wall", "encode_captions_per_s")


def subset(captions: Path, limit: int | None, folder: Path) -> Path:
    """``captions`` itself, or its first ``limit`` rows written to ``folder``."""
    if limit is None:
        return captions
    with open(captions, newline="") as fh:
        reader = csv.reader(fh)
        rows = [next(reader), *(row for _, row in zip(range(limit), reader, strict=False))]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "pairs.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return folder / "pairs.csv"


def warm_up(pairs: Path, images_root: Path, image_encoder: str, text_encoder: str) -> None:
    """Export both encoders to the ONNX cache (a no-op once done) and read every image once (the page cache)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from asif.encoders import load_image_encoder, load_text_encoder

    load_image_encoder(image_encoder, "cpu", runtime="onnx")
    load_text_encoder(text_encoder, "cpu", runtime="onnx")
    with open(pairs, newline="") as fh:
        for name in {row["image"] for row in csv.DictReader(fh)}:
            (images_root / name).read_bytes()


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by the whole machine (``/proc/stat``, less idle and iowait) and by this process's
    finished children (with theirs)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]  # user ... steal
    machine = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return machine, children.ru_utime + children.ru_stime


def others_cores(since: tuple[float, float], seconds: float) -> float:
    """Cores used by processes other than this one's children since ``since`` (a :func:`cpu_seconds`)."""
    machine, children = cpu_seconds()
    return max(0.0, (machine - since[0]) - (children - since[1])) / max(seconds, 1e-9)


def wait_for_quiet(max_s: float, below: float = 0.3) -> float:
    """Wait up to ``max_s`` seconds for a 2 s stretch in which other processes use under ``below`` cores; returns
    the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_s:
        start = cpu_seconds()
        time.sleep(2.0)
        if others_cores(start, 2.0) < below:
            break
    return time.perf_counter() - t0


def build(variant: str, common: dict, out: Path, quiet_wait: float) -> dict:
    runtime, quantize = VARIANTS[variant]
    waited = wait_for_quiet(quiet_wait)
    start, t0 = cpu_seconds(), time.perf_counter()
    result = run_one({**common, "runtime": runtime, "quantize": quantize, "out": str(out)})
    others = others_cores(start, time.perf_counter() - t0)
    report = json.loads((out / "manifest.json").read_text())["build"]["report"]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "runtime": variant,
        **result,
        "decode_wait_s": round(report["stages"]["wait_seconds"], 1),
        "images_embedded": report["images_embedded_now"],
        "captions_embedded": report["captions_embedded_now"],
        "quiet_wait_s": round(waited, 1),
        "others_cores": round(others, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="rows of captions.csv to build (default: all)")
    ap.add_argument("--image-encoder", default="effnet-lite0")
    ap.add_argument("--text-encoder", default="minilm")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--decode-workers", type=int, default=None, help="default: the build's own default")
    ap.add_argument("--variants", default="torch,onnx,onnx+int8", help=f"builds to run: {', '.join(VARIANTS)}")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "build_runtime_results.json")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--quiet-wait", type=float, default=120, help="seconds to wait for other processes to quiet down")
    args = ap.parse_args()
    flickr = SHARED / "flickr8k"
    if not (flickr / "captions.csv").is_file():
        raise SystemExit(f"no Flickr8k under {SHARED} (set ASIF_SHARED_DATA)")
    work = args.work or Path(tempfile.mkdtemp(prefix="asif-build-runtime-"))
    try:
        pairs = subset(flickr / "captions.csv", args.limit, work)
        print("warming up (ONNX export cache, page cache) ...", file=sys.stderr)
        warm_up(pairs, flickr / "images", args.image_encoder, args.text_encoder)
        common = {
            "pairs": str(pairs),
            "images_root": str(flickr / "images"),
            "image_encoder": args.image_encoder,
            "text_encoder": args.text_encoder,
            "batch_size": args.batch_size,
        }
        if args.decode_workers is not None:
            common["decode_workers"] = args.decode_workers
        results = []
        for variant in args.variants.split(","):
            runtime, quantize = VARIANTS[variant]
            print(f"building with --runtime {runtime} --quantize {quantize} ...", file=sys.stderr)
            results.append(build(variant, common, work / f"index-{runtime}-{quantize}", args.quiet_wait))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    by = {r["runtime"]: r for r in results}
    ratios = {}
    for variant in (v for v in by if v != "torch" and "torch" in by):
        ratio = {k: round(by[variant][k] / max(by["torch"][k], 1e-9), 2) for k in RATES}
        ratio["wall_s"] = round(by["torch"]["wall_s"] / max(by[variant]["wall_s"], 1e-9), 2)  # speed-up: torch / it
        ratios[variant] = ratio
    keys = [
        "runtime", "pairs", "images", "decode_workers", "encode_img_per_s", "images_per_s_wall",
        "encode_captions_per_s", "decode_wait_s", "embed_wall_s", "wall_s", "peak_rss_mb", "others_cores",
    ]  # fmt: skip
    print_table([*results, *({"runtime": f"{v} / torch", **r} for v, r in ratios.items())], keys)
    record = {
        "limit": args.limit,
        "cpus": os.cpu_count(),
        "image_encoder": args.image_encoder,
        "text_encoder": args.text_encoder,
        "batch_size": args.batch_size,
        "results": results,
        **{f"{v.replace('+', '_')}_over_torch": r for v, r in ratios.items()},
        "target": "onnx (the default: float) >= 4x torch in the image encoder's img/s",
        "target_met": ratios.get("onnx", {}).get("encode_img_per_s", 0.0) >= 4.0,
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
