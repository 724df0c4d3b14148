"""End-to-end benchmark: the request a user sends, over loopback HTTP, against the encoder alone (issue #26).

    python bench/e2e.py --sizes demo,1m --runtimes onnx,torch --json bench/e2e_results.json
    python bench/e2e.py --sizes demo,1m --synthetic-n 100000 --runtimes onnx     (a quicker check)

For each index size x server runtime, ``asif serve`` runs as a subprocess (``--log-level warning``, no API key)
and a stdlib ``http.client`` client (keep-alive, multipart bodies of the raw JPEG bytes built before the clock
starts, so that the client takes little of the 2 cores it shares with the server) sends real photos
(Imagenette val JPEGs, a different photo per request) and measures:

1. single-image ``POST /v1/classify`` against a stored 10-label set (the Imagenette classes, 7 default templates):
   p50/p99 over sequential requests after a warm-up;
2. a 32-image classify request: ms per image (p50 request latency / 32);
3. N concurrent clients (threads, one keep-alive connection each) sending single-image requests: images/s over a
   fixed window after a warm-up;
4. ``POST /v1/search`` with a text (distinct Flickr8k captions): p50/p99;
5. an inline 10-label classify (the same labels in the request): p50/p99 after a warm-up (the first call embeds
   the labels and caches their representations; its latency is reported apart as ``inline_first_ms``).

Each phase also records the server's CPU time (``/proc/<pid>/stat``), this client's CPU time, the server's own view
of the route latency and the image encoder's mean batch size (``/metrics`` deltas).

Index sizes: ``demo`` (Flickr8k, 40,450 pairs, effnet-lite0 + MiniLM, built into ``runs/demo`` if missing) and
synthetic sizes (``1m``, ``100k``, ``250000``): an index of n seeded synthetic pairs (``bench.synthetic_index``'s
``write_index``) whose manifest names the real encoders, so that the served model runs real photos through the real
networks against synthetic anchors; cached under ``--cache`` (``runs/e2e``).

The floor, measured in this process while no server runs: the image encoder alone under each runtime, batch 1 and
batch 32, (a) the network alone (``encode_prepared`` on prepared arrays) and (b) decode + prepare + network
(``open_image`` on the JPEG bytes, ``prepare``, ``encode_prepared``); the text encoder at batch 1.

The machine is shared: before the floor and each server the bench waits (``--quiet-wait``) for other processes to
go quiet, measures the cores they used during every phase (``/proc/stat`` less this process and the server),
measures the floor again (``--floor-tries``) when they were busy, and flags the figures taken under contention.

Ratios against the targets of the issue (each server column against the floor of its own runtime): single-image
p50 / floor batch 1 <= 2, p99 / p50 <= 2, 32-image ms/img / floor batch 32 ms/img <= 1.3, concurrent img/s /
floor batch-32 img/s >= 0.6; each against both floors (decode+prepare+network, network alone).

This module is the entry point (options, the run, the results); the parts: ``bench/e2e_inputs.py`` (encoders, sizes,
photos, labels, captions, the indices), ``bench/e2e_client.py`` (HTTP client, load generators), ``bench/e2e_server.py``
(the served subprocess, ``/metrics``, other processes' cores), ``bench/e2e_phases.py`` (workload, phases),
``bench/e2e_floor.py`` (the encoder alone) and ``bench/e2e_report.py`` (ratios, tables, the results file).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asif.state.persist import read_manifest
from bench.e2e_floor import floor
from bench.e2e_inputs import (
    ensure_demo,
    ensure_synthetic,
    load_captions,
    load_classes,
    load_photos,
    parse_size,
    real_identities,
    size_name,
)
from bench.e2e_phases import Workload, measure_server, workload
from bench.e2e_report import TARGETS, machine, ratios, report, write_results
from bench.e2e_server import Server, wait_for_quiet
from bench.measure import code_version

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


# -- main ----------------------------------------------------------------------------------------------------
def index_for(size: int | str, args: argparse.Namespace, ids: Callable[[], dict[str, Any]]) -> tuple[Path, dict]:
    if size == "demo":
        return args.demo_index, ensure_demo(args.demo_index, args.data)
    assert isinstance(size, int)
    return ensure_synthetic(args.cache, size, ids())


def serve_and_measure(index: Path, runtime: str, work: Workload, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    server = Server(index, runtime, args.cache / "logs" / f"serve-{tag}-{runtime}.log")
    try:
        ready = server.wait_ready(args.ready_timeout)
        print(f"  {tag}/{runtime}: ready in {ready:.1f} s on port {server.port}", flush=True)
        quiet = wait_for_quiet(args.quiet_wait)
        return {"ready_s": ready, "quiet_wait": quiet, **measure_server(server, work, args)}
    finally:
        server.stop()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="demo,1m", help="demo and/or synthetic pair counts (1m, 100k, 250000)")
    p.add_argument("--synthetic-n", type=int, help="replace the synthetic sizes of --sizes with this count")
    p.add_argument("--runtimes", default="onnx", help="server (and floor) runtimes: onnx, torch or onnx,torch")
    p.add_argument("--floor-runtimes", default="onnx,torch", help="runtimes of the floor (plus those of --runtimes)")
    p.add_argument("--data", type=Path, default=DATA, help="the shared data folder (flickr8k, imagenette)")
    p.add_argument("--demo-index", type=Path, default=ROOT / "runs" / "demo")
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "e2e", help="synthetic indices and server logs")
    p.add_argument("--requests", type=int, default=200, help="timed sequential requests (single, inline, search)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch-requests", type=int, default=10, help="timed 32-image requests")
    p.add_argument("--batch-warmup", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--crowd-seconds", type=float, default=10.0, help="window of the concurrent phase")
    p.add_argument("--crowd-warmup-s", type=float, default=2.0)
    p.add_argument("--floor-singles", type=int, default=100, help="batch-1 calls per floor figure")
    p.add_argument("--floor-tries", type=int, default=3, help="floor measurements while others use the cores")
    p.add_argument("--floor-batches", type=int, default=10, help="batch-32 calls per floor figure")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="before the floor and each server: wait up to this long for "
        "other processes to use < 0.25 cores (2-core machine shared with builds and tests)",
    )
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "e2e_results.json")
    args = p.parse_args(argv)
    sizes = [parse_size(t) for t in args.sizes.split(",") if t.strip()]
    if args.synthetic_n:
        sizes = [s if s == "demo" else args.synthetic_n for s in sizes]
    args.sizes = list(dict.fromkeys(sizes))
    args.runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    floor_runtimes = [r.strip() for r in args.floor_runtimes.split(",") if r.strip()]
    args.floor_runtimes = list(dict.fromkeys([*floor_runtimes, *args.runtimes]))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    t0 = time.perf_counter()
    photos = load_photos(args.data / "imagenette" / "val", args.seed)
    labels = load_classes(args.data / "imagenette" / "classes.tsv")
    captions = load_captions(args.data / "flickr8k" / "captions.csv", args.warmup + args.requests)
    cached_ids: dict[str, Any] = {}

    def ids() -> dict[str, Any]:
        return cached_ids.setdefault("ids", real_identities())

    indices = {size: index_for(size, args, ids) for size in args.sizes}
    cached_ids.clear()
    gc.collect()
    fl = floor(args.floor_runtimes, photos, captions, args)  # no server runs yet
    work = workload(photos, labels, captions, args)
    runs = []
    for size, (folder, prep) in indices.items():
        pairs = int(read_manifest(folder).get("counts", {}).get("pairs", 0))
        for runtime in args.runtimes:
            run = serve_and_measure(folder, runtime, work, args, size_name(size))
            run.update(size=size_name(size), pairs=pairs, runtime=runtime, index=str(folder), index_prep=prep)
            run["ratios"] = ratios(run, fl[runtime])
            runs.append(run)
    settings = {k: v for k, v in vars(args).items() if k not in ("sizes", "runtimes", "floor_runtimes")}
    settings.update(
        sizes=[size_name(s) for s in args.sizes],
        runtimes=args.runtimes,
        floor_runtimes=args.floor_runtimes,
        client="http.client multipart",
    )
    settings["asif_env"] = {k: v for k, v in os.environ.items() if k.startswith("ASIF_") and k != "ASIF_API_KEY"}
    results = {
        "machine": machine(),
        "code": code_version(),
        "settings": settings,
        "targets": {key: {"description": d, "op": op, "target": t} for key, d, op, t in TARGETS},
        "floor": fl,
        "runs": runs,
        "wall_s": time.perf_counter() - t0,
    }
    write_results(args.json, results, report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
