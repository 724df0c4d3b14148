"""Where the served search spends its time: IVF-PQ scan vs exact re-ranking, and recall, per setting.

python bench/profile_search.py 1000000     # ~6 min at 1M (builds the image index once)
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asif.relrep import exact_topk
from asif.store import build_store, choose_index_spec
from asif.synthetic import SyntheticWorld


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
    for factor, nprobe in [(10, spec.nprobe), (5, spec.nprobe), (3, spec.nprobe), (5, spec.nprobe // 2)]:
        store.spec = dataclasses.replace(spec, rerank_factor=factor, nprobe=nprobe)
        fetch = 800 * factor
        t0 = time.perf_counter()
        _, cand = store._search_ivf(queries, fetch)
        t1 = time.perf_counter()
        _, ids = store._rerank(queries, cand.astype(np.int64), 800)
        t2 = time.perf_counter()
        recall = np.mean([len(np.intersect1d(ids[i], ref[i])) / 800 for i in range(len(queries))])
        print(
            f"re-rank {factor}x, nprobe {store._nprobe_for(fetch)}: IVF-PQ {1000 * (t1 - t0) / len(queries):.2f} ms/q, "
            f"re-rank {1000 * (t2 - t1) / len(queries):.2f} ms/q, recall@800 {recall:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
