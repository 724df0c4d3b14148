"""The ASIF model over each anchor store, side by side in one run: FAISS (in process) and Milvus (milvus-lite).

    python bench/stores.py --sizes 100000 --json bench/stores_results.json
    python bench/run.py --store milvus --sizes 100000            (the same)

For each n, seeded clustered synthetic pairs (1280-d images, 384-d captions, as bench/live_traffic.py) are loaded
into an image and a caption store of each kind: FAISS with the index ``choose_index_spec`` picks for n (IVF-PQ +
exact re-ranking above 50k), Milvus with its default FLAT index (exact). A label set of 100 classes is registered,
then measured: build (loading the stores), one-image classify p50/p99 (k=800, p=8), single add and delete p50/p99
(label set following), and the top-1 agreement and recall@800 of each store against exact search over the same
vectors (numpy, independent of both stores).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asif.serving.labels import LabelSet
from asif.serving.model import AsifModel
from asif.stores import VectorStore, build_store, choose_index_spec, set_faiss_threads
from asif.tuning.synthetic import SyntheticWorld
from bench.measure import percentiles

K, P = 800, 8.0
D_IMAGE, D_TEXT = 1280, 384
N_CLASSES = 100
EDITS = 100


def make_stores(kind: str, img: np.ndarray, txt: np.ndarray, ids: np.ndarray, workdir: Path) -> list[VectorStore]:
    if kind == "faiss":
        return [build_store(x, ids, choose_index_spec(len(x), x.shape[1], "auto")) for x in (img, txt)]
    from pymilvus import MilvusClient

    from asif.stores.milvus_store import MilvusStore, load_rows

    client = MilvusClient(str(workdir / "milvus.db"))
    stores = [MilvusStore(client, role, x.shape[1]) for role, x in (("image", img), ("text", txt))]
    for store, x in zip(stores, (img, txt), strict=True):
        load_rows(store, x, bulk=50_000)  # ids 0..n-1, as `ids` here
    return stores


def exact_top(queries: np.ndarray, anchors: np.ndarray, k: int) -> np.ndarray:
    sims = queries @ anchors.T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def bench_store(kind: str, data: dict[str, np.ndarray], workdir: Path) -> dict[str, Any]:
    img, txt, q = data["img"], data["txt"], data["queries"]
    n = len(img)
    ids = np.arange(n, dtype=np.int64)
    t = time.perf_counter()
    stores = make_stores(kind, img, txt, ids, workdir)
    build_s = time.perf_counter() - t
    model = AsifModel(*stores, k=K, p=P)
    names = tuple(f"class {i}" for i in range(N_CLASSES))
    labels = model.register_labels("set", LabelSet(names, ("{}",)), data["labels"])
    model.classify(q[:1], labels)  # warm-up
    took = []
    for row in q:
        t = time.perf_counter()
        model.classify(row[None, :], labels, top=5)
        took.append(time.perf_counter() - t)
    # Agreement with exact search on the image side (the side the query uses): top-1 and recall@800.
    ref = exact_top(q[:50], img, K)
    _, got = stores[0].search(q[:50], K)
    recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(got.tolist(), ref.tolist(), strict=True)]))
    top1 = float(np.mean(got[:, 0] == ref[:, 0]))
    fresh_img, fresh_txt = data["fresh_img"], data["fresh_txt"]
    adds, deletes = [], []
    for i in range(EDITS):
        t = time.perf_counter()
        model.add_pairs(np.array([n + i]), fresh_img[i : i + 1], fresh_txt[i : i + 1])
        adds.append(time.perf_counter() - t)
        t = time.perf_counter()
        model.remove_pairs(np.array([i]))
        deletes.append(time.perf_counter() - t)
    return {
        "store": stores[0].describe(),
        "build_s": build_s,
        "classify": percentiles(took),
        "add": percentiles(adds),
        "delete": percentiles(deletes),
        "image_recall_at_800": recall,
        "image_top1_agreement": top1,
    }


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        f"ASIF model over each store (k={K}, p={P:g}, {N_CLASSES} labels registered): one-image classify, single "
        "add / delete (label set following), p50 / p99 ms; agreement with exact search on the image side",
        "",
        "| n | store | index | build s | classify | add | delete | recall@800 | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for kind, m in r["stores"].items():
            pp = {x: f"{m[x]['p50_ms']:.2f} / {m[x]['p99_ms']:.2f}" for x in ("classify", "add", "delete")}
            rows.append(
                f"| {r['n']:,} | {kind} | {m['store'].get('factory')} | {m['build_s']:.1f} | {pp['classify']} | "
                f"{pp['add']} | {pp['delete']} | {m['image_recall_at_800']:.3f} | {m['image_top1_agreement']:.2f} |"
            )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000")
    parser.add_argument("--stores", default="faiss,milvus")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench/stores_results.json"))
    args = parser.parse_args(argv)
    set_faiss_threads(1)
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "k": K,
        "p": P,
        "results": [],
    }
    for n in (int(s) for s in args.sizes.split(",")):
        world = SyntheticWorld(d_image=D_IMAGE, d_text=D_TEXT, n_classes=N_CLASSES, seed=args.seed)
        img, txt = world.anchors(n)
        fresh_img, fresh_txt = world.anchors(EDITS)
        queries, _ = world.queries(args.queries)
        data = {  # the same vectors for every store
            "img": img,
            "txt": txt,
            "fresh_img": fresh_img,
            "fresh_txt": fresh_txt,
            "queries": queries,
            "labels": world.labels(),
        }
        entry: dict[str, Any] = {"n": n, "stores": {}}
        for kind in args.stores.split(","):
            print(f"n={n:,} {kind} ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="asif-stores-bench-") as tmp:
                entry["stores"][kind] = bench_store(kind, data, Path(tmp))
        report["results"].append(entry)
        args.json.write_text(json.dumps(report, indent=2))
    print(table(report["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
