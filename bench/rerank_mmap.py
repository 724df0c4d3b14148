"""Re-ranking tables memory-mapped from disk, against read into memory: search latency with a cold and a warm
page cache, and the memory the process holds.

    python bench/rerank_mmap.py --n 500000 --json bench/rerank_mmap_results.json

Seeded clustered synthetic image anchors (1280-d), an IVF-PQ store with float32 re-ranking (the default), written
to a temporary folder. Then, on the same 200 queries (k=800, one at a time):

- ``read``: the table read into memory (what `asif serve` does);
- ``mmap cold``: the file's pages dropped from the page cache (``posix_fadvise(DONTNEED)``), then mapped: the
  first queries fault their ~4,000 candidate rows in from disk;
- ``mmap warm``: the same mapping, queried again once every page the queries touch is cached.

RSS counts mapped pages that were touched, so the ``rss`` columns show what the page cache holds for this process.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asif.stores import FaissStore, build_store, choose_index_spec, refine_path, set_faiss_threads
from asif.tuning.synthetic import SyntheticWorld
from bench.measure import percentiles, rss_mb

K = 800


def timed(store: FaissStore, queries: np.ndarray) -> list[float]:
    out = []
    for q in queries:
        t = time.perf_counter()
        store.search(q[None, :], K)
        out.append(time.perf_counter() - t)
    return out


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--json", type=Path, default=Path("bench/rerank_mmap_results.json"))
    args = parser.parse_args(argv)
    set_faiss_threads(1)
    world = SyntheticWorld(d_image=1280, d_text=384, n_classes=100, seed=0)
    img = np.concatenate([world.anchors(min(100_000, args.n - s))[0] for s in range(0, args.n, 100_000)])
    queries, _ = world.queries(args.queries)
    spec = choose_index_spec(len(img), img.shape[1], "ivfpq")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.faiss"
        build_store(img, np.arange(len(img)), spec).write(path)
        table_mb = refine_path(path).stat().st_size / 2**20
        del img
        results = {}
        base = rss_mb()
        read = FaissStore.read(path, 1280, spec)
        timed(read, queries[:5])
        results["read"] = {**percentiles(timed(read, queries)), "rss_added_mb": rss_mb() - base}
        del read
        drop_from_page_cache(refine_path(path))
        base = rss_mb()
        mapped = FaissStore.read(path, 1280, spec, mmap=True)
        cold = timed(mapped, queries)
        results["mmap cold (first pass)"] = {**percentiles(cold), "rss_added_mb": rss_mb() - base}
        results["mmap cold, first 20 queries"] = percentiles(cold[:20])
        results["mmap warm"] = {**percentiles(timed(mapped, queries)), "rss_added_mb": rss_mb() - base}
    report = {"n": args.n, "k": K, "index": spec.factory, "table_mb": table_mb, "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"n={args.n:,}, {spec.factory} + Flat re-ranking table of {table_mb:.0f} MB, k={K}, one query at a time")
    print("| table | search p50 / p99 ms | process RSS added MB |")
    print("|---|---|---|")
    for name, r in results.items():
        rss = f"{r['rss_added_mb']:.0f}" if "rss_added_mb" in r else ""
        print(f"| {name} | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} | {rss} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
