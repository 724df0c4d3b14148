"""Live-traffic benchmark of the served model (asif.serving.live.LiveModel) on synthetic embeddings.

    python bench/live_traffic.py --sizes 100000,1000000 --json bench/live_results.json
    python bench/run.py --live --sizes 100000,1000000 --json bench/live_results.json   (the same)

For each n an index folder is written straight from seeded clustered embeddings (1280-d images, 384-d
captions, IVF-PQ + exact re-ranking above 50k pairs, as ``choose_index_spec`` picks), opened as a
LiveModel with 100 stored label sets of 100 classes (7 templates' worth each), k=800, p=8. Measured in
one run, one classify thread issuing single-image requests back to back:

1. classify p50/p99 (a) idle, (b) under ~20 edits/s from another thread (adds of fresh pairs alternating
   with deletes of random existing ids), (c) under the same edits plus a thread taking snapshots back to
   back whenever an edit is pending, (d) while ``compact()`` runs in another thread, no edits (its
   duration too); p99 ratios against idle; 1,000 requests per phase after a warm-up. Phases a-c are
   interleaved in 5 rounds and pooled, so that a slow spell of this noisy machine falls on all three alike;
2. the time and bytes of a snapshot after exactly 1,000 (and 100) edits, beside a full compaction;
3. add and delete latency (quiet, then under traffic) with the 100 label sets registered;
4. the first (and second) classify right after each of those 1,000 edits against steady classification.

For attribution, each classify request records its read-lock wait and the classify thread's CPU time
(the rest is time off CPU: the GIL, a label set's lock, no free core), and whether an edit overlapped it;
each phase counts the model's background jobs (label sets catching up, scorer rebuilds) and the interpreter's
garbage collections.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from threadpoolctl import threadpool_limits

from asif.stores import set_faiss_threads
from bench.live_phases import EDIT_RATE, N_LABEL_SETS, SAMPLES, bench_size
from bench.live_report import table
from bench.measure import code_version, peak_rss_mb
from bench.synthetic_index import K, P


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--samples", type=int, default=None, help=f"classify requests per phase (default {SAMPLES:,})")
    parser.add_argument("--label-sets", type=int, default=N_LABEL_SETS, help="stored label sets of 100 classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench/live_results.json"))
    parser.add_argument("--workdir", type=Path, default=None, help="where index folders are written (a temp dir)")
    parser.add_argument("--faiss-threads", type=int, default=1)
    parser.add_argument("--blas-threads", type=int, default=1, help="numpy BLAS threads (ASIF_BLAS_THREADS)")
    parser.add_argument("--no-verify", action="store_true", help="skip checksums on load and compaction")
    parser.add_argument(
        "--switch-interval", type=float, default=None, help="sys.setswitchinterval (s) for a GIL experiment"
    )
    args = parser.parse_args(argv)
    if args.label_sets < 1:
        parser.error("--label-sets must be at least 1 (classification uses the first)")
    set_faiss_threads(args.faiss_threads)  # as the service does (ASIF_FAISS_THREADS), in every thread
    threadpool_limits(args.blas_threads, user_api="blas")  # as the service does (ASIF_BLAS_THREADS)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below on SIGTERM too
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="asif-live-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    report: dict[str, Any] = {
        "machine": machine,
        "k": K,
        "p": P,
        "edit_rate_per_s": EDIT_RATE,
        "faiss_threads": args.faiss_threads,
        "switch_interval_s": sys.getswitchinterval(),
        "verify_checksums": not args.no_verify,
        "code": code_version(),
        "results": [],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            print(f"n={n:,} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            load_before = os.getloadavg()
            samples = args.samples or SAMPLES
            result = bench_size(n, samples, args.seed, workdir, not args.no_verify, args.label_sets)
            result["wall_s"] = time.perf_counter() - t
            result["loadavg_1_5_15"] = {"before": load_before, "after": os.getloadavg()}
            result["code"] = code_version()  # the serving code may change between sizes of a long run
            report["results"].append(result)
            report.update(wall_s=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())
            args.json.write_text(json.dumps(report, indent=2))  # after each size: a crash keeps the others
            print(f"  n={n:,} done in {result['wall_s']:.0f} s; peak RSS {peak_rss_mb():.0f} MB", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(report["results"]))
    print(f"\nwall {report['wall_s']:.0f} s, peak RSS {report['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
