"""Where the served search spends its time: IVF-PQ scan vs exact re-ranking, and recall, per setting.

python bench/profile_search.py 1000000     # ~4 min at 1M (builds the image index once)

One query at a time (as the service sees them), FAISS on one thread. "PQ only" is the recall of the
PQ ranking without re-ranking: what an index within 200 bytes per pair gives on its own.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asif.math.topk import exact_topk
from asif.stores import build_store, choose_index_spec
from asif.tuning.metrics import recall_at_k
from asif.tuning.synthetic import SyntheticWorld


def main(n: int) -> None:
    faiss.omp_set_num_threads(1)
    world = SyntheticWorld(1280, 384, n_classes=100, seed=0)
    img = np.empty((n, 1280), np.float32)
    for s in range(0, n, 100_000):
        img[s : s + 100_000], _ = world.anchors(min(100_000, n - s))
    queries, _ = world.queries(50)
    spec = choose_index_spec(n, 1280)
    store = build_store(img, np.arange(n), spec)
    _, ref = exact_topk(queries, img, 800)
    print(f"{spec.factory}, default nprobe >= {spec.nprobe}, default re-rank factor {spec.rerank_factor:g}")
    settings = [(10, spec.nprobe), (5, spec.nprobe), (4, spec.nprobe), (3, spec.nprobe), (5, spec.nprobe // 2)]
    for factor, nprobe in settings:
        store.spec = dataclasses.replace(spec, rerank_factor=factor, nprobe=nprobe)
        fetch = 800 * factor
        scan, rerank, found = [], [], []
        for q in queries:
            t0 = time.perf_counter()
            _, cand = store._search_ivf(q[None, :], fetch)
            t1 = time.perf_counter()
            _, ids = store._rerank(q[None, :], cand, 800)
            t2 = time.perf_counter()
            scan.append(t1 - t0)
            rerank.append(t2 - t1)
            found.append((ids[0], cand[0, :800]))
        recall = recall_at_k(np.array([f[0] for f in found]), ref)
        pq_only = recall_at_k(np.array([f[1] for f in found]), ref)
        print(
            f"re-rank {factor}x ({fetch} candidates), nprobe {store._nprobe_for(fetch)}: "
            f"IVF-PQ scan p50 {1000 * np.median(scan):.2f} ms, re-rank p50 {1000 * np.median(rerank):.2f} ms, "
            f"recall@800 {recall:.4f} (PQ only {pq_only:.4f})",
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
