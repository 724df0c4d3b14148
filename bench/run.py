"""Benchmark of the served path against the dense exact reference, on synthetic embeddings.

    python bench/run.py --sizes 10000,100000,1000000 --json bench/results.json

For each n: seeded clustered anchors (1280-d images, 384-d captions), 100 classes x 7 templates,
k=800, p=8. Side by side in one run: per-image latency (p50/p99) and batch-64 throughput of the
served path (FAISS store + cached sparse label representations) and of the dense reference
(chunked matrix product + top-k over all anchors, then the same scoring); recall@800; top-1
agreement; bytes per pair; build time; add/delete latency with 100 label sets' worth of labels
cached; and the HTTP overhead of POST /v1/classify on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asif.math.relrep import KeyMatrix, sparsify
from asif.math.topk import exact_topk
from asif.serving.labels import LabelSet, combine_prompt_embeddings
from asif.serving.model import AsifModel
from asif.stores import FaissStore, choose_index_spec, count_distinct_rows, set_faiss_threads
from asif.tuning.metrics import recall_at_k
from asif.tuning.synthetic import SyntheticWorld
from bench.measure import peak_rss_mb, rss_mb
from bench.measure import percentiles as measured_percentiles

K, P = 800, 8.0
N_CLASSES, N_TEMPLATES = 100, 7


def generate(
    world: SyntheticWorld, n: int, captions_per_image: int = 1, chunk: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """n pairs; with captions_per_image c, pair i shows image i // c (c identical image anchors in a row)."""
    img = np.empty((n, world.d_image), dtype=np.float32)
    txt = np.empty((n, world.d_text), dtype=np.float32)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        img[start:end], txt[start:end] = world.anchors(end - start)
    if captions_per_image > 1:
        img[:] = img[np.arange(n) // captions_per_image * captions_per_image]
    return img, txt


def percentiles(samples: list[float]) -> dict[str, float]:
    """Seconds -> {p50_ms, p99_ms} (bench.measure.percentiles without n and max, as results.json has them)."""
    both = measured_percentiles(samples)
    return {"p50_ms": both["p50_ms"], "p99_ms": both["p99_ms"]}


def build(vectors: np.ndarray, ids: np.ndarray, refine: str | None = "Flat") -> tuple[FaissStore, dict[str, float]]:
    spec = choose_index_spec(len(vectors), vectors.shape[1], refine=refine, distinct=count_distinct_rows(vectors))
    store = FaissStore(vectors.shape[1], spec)
    t0 = time.perf_counter()
    if not store.is_trained:
        rng = np.random.default_rng(0)
        n_train = min(len(vectors), spec.train_size)
        store.train(vectors[rng.choice(len(vectors), n_train, replace=False)])
    t1 = time.perf_counter()
    for start in range(0, len(vectors), 100_000):
        store.add(ids[start : start + 100_000], vectors[start : start + 100_000])
    t2 = time.perf_counter()
    return store, {"train_s": t1 - t0, "add_s": t2 - t1}


def dense_reference(queries: np.ndarray, img: np.ndarray, keys: KeyMatrix, k: int = K, p: float = P) -> np.ndarray:
    """The original ASIF computation: similarities to ALL anchors (chunked matmul), top-k, then scoring."""
    sims, idx = exact_topk(queries, img, k)
    return keys.score(sparsify(sims, idx, p))


def bench_size(
    n: int, n_queries: int, seed: int, captions_per_image: int = 1, refines: Sequence[str] = ("Flat",)
) -> Iterator[dict]:
    """One result per re-ranking table kind, on the same data."""
    world = SyntheticWorld(d_image=1280, d_text=384, n_classes=N_CLASSES, seed=seed)
    data = make_data(world, n, n_queries, captions_per_image)
    for refine in refines:
        print(f"n={n:,} re-ranking {refine} ...", file=sys.stderr, flush=True)
        yield bench_one(world, data, n, n_queries, seed, captions_per_image, refine)


def make_data(world: SyntheticWorld, n: int, n_queries: int, captions_per_image: int) -> dict:
    t0 = time.perf_counter()
    img, txt = generate(world, n, captions_per_image)
    queries, _ = world.queries(n_queries)
    prompts = np.concatenate(
        [
            world._observe(
                world.centres + 0.3 * world.rng.standard_normal(world.centres.shape).astype(np.float32), world.w_text
            )[:, None, :]
            for _ in range(N_TEMPLATES)
        ],
        axis=1,
    ).reshape(N_CLASSES * N_TEMPLATES, -1)
    label_emb = combine_prompt_embeddings(prompts, N_CLASSES)
    return {"img": img, "txt": txt, "queries": queries, "label_emb": label_emb, "generate_s": time.perf_counter() - t0}


def bench_one(
    world: SyntheticWorld, data: dict, n: int, n_queries: int, seed: int, captions_per_image: int, refine: str
) -> dict:
    out: dict = {"n": n, "captions_per_image": captions_per_image, "generate_s": data["generate_s"]}
    img, txt, queries, label_emb = data["img"], data["txt"], data["queries"], data["label_emb"]
    ids = np.arange(n, dtype=np.int64)

    kind = None if refine.lower() == "none" else refine
    img_store, img_build = build(img, ids, kind)
    txt_store, txt_build = build(txt, ids, kind)
    out["index"] = {"image": img_store.spec.factory, "text": txt_store.spec.factory, "refine": img_store.spec.refine}
    out["build"] = {"image": img_build, "text": txt_build}
    out["distinct_image_vectors"] = img_store.nvectors
    bpv_img, bpv_txt = img_store.bytes_per_vector(), txt_store.bytes_per_vector()
    out["bytes_per_pair"] = {
        "indices": bpv_img["index"] + bpv_txt["index"],
        "refine_stores": bpv_img.get("refine", 0.0) + bpv_txt.get("refine", 0.0),
        "dense_float32": 4 * (img.shape[1] + txt.shape[1]),
    }
    out["bytes_per_pair"]["in_ram"] = out["bytes_per_pair"]["indices"] + out["bytes_per_pair"]["refine_stores"]

    model = AsifModel(img_store, txt_store, k=K, p=P)
    names = tuple(f"class {i}" for i in range(N_CLASSES))
    labels = model.register_labels("bench", LabelSet(names, ("{}",)), label_emb)
    keys = labels.scorer(K, P).base  # just made: no stale rows

    # Served path, one image at a time (after a few untimed warm-up queries), then batches of 64.
    for q in queries[:5]:
        model.classify(q[None, :], labels, top=1)
        dense_reference(q[None, :], img, keys)
    served_lat = []
    for q in queries:
        t = time.perf_counter()
        model.classify(q[None, :], labels, top=1)
        served_lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    reps = max(1, 256 // 64)
    for r in range(reps):
        model.classify(queries[(r * 64) % n_queries :][:64], labels, top=1)
    served_tp = reps * 64 / (time.perf_counter() - t)

    # Dense exact reference, same queries.
    n_dense = min(n_queries, 50 if n >= 1_000_000 else n_queries)
    dense_lat = []
    for q in queries[:n_dense]:
        t = time.perf_counter()
        dense_reference(q[None, :], img, keys)
        dense_lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    dense_scores = dense_reference(queries[:64], img, keys)
    dense_tp = 64 / (time.perf_counter() - t)
    out["latency_single"] = {"served": percentiles(served_lat), "dense": percentiles(dense_lat)}
    out["throughput_batch64_img_s"] = {"served": served_tp, "dense": dense_tp}
    out["speedup_p50"] = out["latency_single"]["dense"]["p50_ms"] / out["latency_single"]["served"]["p50_ms"]

    # Quality: recall@800 of the image index, top-1 agreement with the dense reference.
    _, served_ids = img_store.search(queries, K)
    _, exact_idx = exact_topk(queries, img, K)
    out["recall_at_800"] = recall_at_k(served_ids, ids[exact_idx])
    dense_all = (
        np.concatenate([dense_scores, dense_reference(queries[64:], img, keys)]) if n_queries > 64 else dense_scores
    )
    served_top = np.array([names.index(p.scores[0][0]) for p in model.classify(queries, labels, top=1)])
    out["top1_agreement"] = float((served_top == dense_all.argmax(axis=1)).mean())

    # Live edits with 100 label sets of 100 labels cached (10,000 labels follow every edit).
    for s in range(99):
        model.register_labels(f"set{s}", LabelSet(names, ("{}",)), label_emb)
    new_img, new_txt = world.anchors(200)
    add_lat, del_lat = [], []
    for i in range(200):
        t = time.perf_counter()
        model.add_pairs(np.array([n + i]), new_img[i : i + 1], new_txt[i : i + 1])
        add_lat.append(time.perf_counter() - t)
    victims = np.random.default_rng(seed).choice(n, 200, replace=False)
    for v in victims:
        t = time.perf_counter()
        model.remove_pairs(np.array([v]))
        del_lat.append(time.perf_counter() - t)
    out["edit_latency"] = {
        "add": percentiles(add_lat),
        "delete": percentiles(del_lat),
        "labels_cached": 100 * N_CLASSES,
    }
    out["rss_mb"] = rss_mb()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def http_overhead(n_requests: int = 200) -> dict:
    """POST /v1/classify on loopback minus the in-process classify time, with a trivial encoder."""
    import base64
    import io
    import tempfile

    import httpx
    from PIL import Image

    from index_builder.build import BuildConfig, run_build
    from tests.conftest import COLOURS, HashTextEncoder, PixelEncoder, write_pair_collection
    from tests.servers import Server

    root = Path(tempfile.mkdtemp())
    images, pairs = write_pair_collection(root / "data")
    run_build(BuildConfig(pairs=pairs, images_root=images, out=root / "index", k=10), PixelEncoder(), HashTextEncoder())
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 30)).save(buf, format="JPEG")
    body = {
        "images": [base64.b64encode(buf.getvalue()).decode()],
        "labels": list(COLOURS),
        "templates": ["a {} square"],
    }
    server = Server(root / "index", {"ASIF_BATCH_MAX_WAIT_MS": "0"})
    try:
        lat = []
        with httpx.Client(base_url=server.http.base_url) as http:
            http.post("/v1/classify", json=body)
            for _ in range(n_requests):
                t = time.perf_counter()
                assert http.post("/v1/classify", json=body).status_code == 200
                lat.append(time.perf_counter() - t)
    finally:
        server.stop()
    from asif.serving.loading import open_index

    loaded = open_index(root / "index", PixelEncoder(), HashTextEncoder())
    labels = loaded.model.make_labels(LabelSet(tuple(COLOURS), ("a {} square",)))
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    inproc = []
    for _ in range(n_requests):
        t = time.perf_counter()
        loaded.model.classify_images([img], labels)
        inproc.append(time.perf_counter() - t)
    http_p = percentiles(lat)
    in_p = percentiles(inproc)
    return {"http": http_p, "in_process": in_p, "overhead_p50_ms": http_p["p50_ms"] - in_p["p50_ms"]}


def table(results: list[dict], http: dict | None) -> str:
    rows = [
        "| n | index (image / text) | served p50 / p99 ms | dense p50 / p99 ms | speed-up (p50) | "
        "batch-64 img/s served / dense | recall@800 | top-1 agree | bytes/pair indices (+refine) | "
        "build train+add s | add p99 ms | delete p99 ms | RSS MB |",
        "|" + "---|" * 13,
    ]
    for r in results:
        ls, ld = r["latency_single"]["served"], r["latency_single"]["dense"]
        b = r["build"]
        rows.append(
            f"| {r['n']:,} | {r['index']['image']} / {r['index']['text']} + {r['index']['refine'] or 'none'} | "
            f"{ls['p50_ms']:.1f} / {ls['p99_ms']:.1f} | "
            f"{ld['p50_ms']:.1f} / {ld['p99_ms']:.1f} | {r['speedup_p50']:.1f}x | "
            f"{r['throughput_batch64_img_s']['served']:.0f} / {r['throughput_batch64_img_s']['dense']:.0f} | "
            f"{r['recall_at_800']:.3f} | {100 * r['top1_agreement']:.1f}% | "
            f"{r['bytes_per_pair']['indices']:.0f} (+{r['bytes_per_pair']['refine_stores']:.0f}) | "
            f"{b['image']['train_s'] + b['text']['train_s']:.0f}+{b['image']['add_s'] + b['text']['add_s']:.0f} | "
            f"{r['edit_latency']['add']['p99_ms']:.1f} | {r['edit_latency']['delete']['p99_ms']:.1f} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    if http:
        rows.append("")
        rows.append(
            f"HTTP: POST /v1/classify p50 {http['http']['p50_ms']:.2f} ms (p99 {http['http']['p99_ms']:.2f}), "
            f"in-process classify p50 {http['in_process']['p50_ms']:.2f} ms: "
            f"overhead {http['overhead_p50_ms']:.2f} ms p50."
        )
    return "\n".join(rows)


def main() -> int:
    if "--live" in sys.argv[1:]:  # the live-traffic benchmark, with its own options
        from bench.live_traffic import main as live_main

        return live_main([a for a in sys.argv[1:] if a != "--live"])
    if "--store" in sys.argv[1:]:  # the model over the FAISS and the Milvus store, side by side
        from bench.stores import main as stores_main

        argv = sys.argv[1:]
        i = argv.index("--store")
        stores = "faiss," + argv[i + 1] if i + 1 < len(argv) and argv[i + 1] != "faiss" else "faiss"
        return stores_main([*argv[:i], *argv[i + 2 :], "--stores", stores])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--live",
        action="store_true",
        help="run the live-traffic benchmark instead (bench/live_traffic.py; see its --help for its options)",
    )
    parser.add_argument(
        "--store",
        choices=["milvus"],
        help="compare the model over the FAISS store and this one instead (bench/stores.py; see its --help)",
    )
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--faiss-threads", type=int, default=1)
    parser.add_argument(
        "--captions-per-image", type=int, default=1, help="pairs per distinct image (5 in Flickr8k and COCO)"
    )
    parser.add_argument(
        "--rerank",
        default="Flat",
        help="re-ranking table kinds of the IVF-PQ stores, compared on the same data: e.g. Flat,SQfp16,SQ8,SQ4,none "
        "(separate with ';' when a kind holds a comma: 'SQ8;PCAR,SQ8')",
    )
    args = parser.parse_args()
    os.environ.setdefault("ASIF_PLUGIN_ENCODERS", "1")
    set_faiss_threads(args.faiss_threads)  # as the service does (ASIF_FAISS_THREADS), in every thread
    results = []
    refines = [r.strip() for r in args.rerank.split(";" if ";" in args.rerank else ",") if r.strip()]
    for n in (int(s) for s in args.sizes.split(",")):
        for result in bench_size(n, args.queries, args.seed, args.captions_per_image, refines):
            results.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    http = None if args.no_http else http_overhead()
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "k": K, "p": P, "results": results, "http": http}, indent=2))
    print(table(results, http))
    return 0


if __name__ == "__main__":
    sys.exit(main())
