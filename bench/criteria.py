"""Label-free criteria for k and p (issue 18) against test accuracy, on Flickr8k caption anchors.

For each run (Imagenette val / CIFAR-10 test x MiniLM / mpnet, effnet-lite0, one anchor per caption, seed 0) and every
(k, p) of the grid: the test top-1 (exact sweep of the test images against the class label embeddings, 7 default
templates, as ``asif eval`` computes it) and the value of each criterion: today's held-out retrieval@1
(:func:`asif.evaluation.auto_kp`'s, rows held out) and those of :mod:`asif.criteria` (images held out). Reports per run
and criterion the Spearman correlation with test top-1 across the grid, the setting each picks (ties: smaller k, then
smaller p), its test top-1 and the gap to the best test top-1.

Embeddings come from the evaluation's cache (``evaluation.run``), so a run after ``asif eval`` encodes nothing but the
70 prompts.

    python bench/criteria.py --json bench/criteria_results.json     # ~6 min on 2 cores, 3 seeds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from asif.criteria import choose, criteria_grid, group_holdout_split
from asif.embcache import EmbeddingCache
from asif.encoders import load_image_encoder, load_text_encoder
from asif.evaluation import DenseSweep, choose_settings, evaluate, holdout_split
from asif.labels import DEFAULT_TEMPLATES, LabelSet, combine_prompt_embeddings
from asif.relrep import exact_topk
from evaluation.data import load_test_set
from evaluation.run import EvalConfig, anchors_from_pairs, embed_image_files

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TESTS = {
    "imagenette": (DATA / "imagenette" / "val", DATA / "imagenette" / "classes.tsv"),
    "cifar10": (DATA / "cifar10" / "test", None),
}
KS = (25, 50, 100, 200, 400, 800, 1600)
PS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
BASELINE = "today: retrieval@1 (rows held out)"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def batched_topk(queries: np.ndarray, anchors: np.ndarray, k: int, batch: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """exact_topk in query batches (bounded memory); same rows as one call."""
    parts = [exact_topk(queries[s : s + batch], anchors, k) for s in range(0, len(queries), batch)]
    return np.concatenate([s for s, _ in parts]), np.concatenate([i for _, i in parts])


def key(k: int, p: float) -> str:
    return f"{k},{p:g}"


def rank_correlation(table: dict, top1: dict) -> float:
    """Spearman correlation of a criterion's values with the test top-1 over the settings of ``top1``."""
    return float(spearmanr([table[kp] for kp in top1], list(top1.values())).statistic)


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    img_enc = load_image_encoder(args.image_encoder, None, 32)
    img_cache = EmbeddingCache(img_enc.identity)
    tests = {}
    for name in args.tests:
        test = load_test_set(*TESTS[name])
        emb, ok = embed_image_files(test.files, img_enc, img_cache, f"{name} images", 32)
        tests[name] = (test, emb[ok], np.asarray(test.labels)[ok])
    grid = [(k, p) for k in KS for p in PS]
    out: dict = {"grid": {"ks": list(KS), "ps": list(PS)}, "seeds": list(args.seeds), "runs": {}}
    test_neighbours: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for text_name in args.text_encoders:
        txt_enc = load_text_encoder(text_name, None, 32)
        txt_cache = EmbeddingCache(txt_enc.identity)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = EvalConfig(
                test=TESTS[args.tests[0]][0], out=Path(tmp), pairs=DATA / "flickr8k" / "captions.csv",
                images_root=DATA / "flickr8k" / "images", image_encoder=args.image_encoder, text_encoder=text_name,
            )  # fmt: skip
            anchors = anchors_from_pairs(cfg, img_enc, txt_enc, img_cache, txt_cache)["caption"]
        ia, ta = anchors.image, anchors.text
        index: dict[Path, int] = {}
        groups = np.array([index.setdefault(f, len(index)) for f in anchors.image_files])
        log(f"{text_name}: {len(ia)} caption anchors of {len(index)} images")

        # The criteria, on each seed's held-out split: they do not depend on the test set.
        by_seed: dict[int, dict[str, dict[tuple[int, float], float]]] = {}
        for seed in args.seeds:
            t = time.perf_counter()
            train, held = holdout_split(len(ia), seed=seed)
            base_sweep = DenseSweep(ia[held], ta[held], ia[train], ta[train], max(KS))
            _, base_table = choose_settings(base_sweep, KS, PS)
            by_seed[seed] = {BASELINE: {(k, w.param): v for (k, w), v in base_table.items()}}
            g_train, g_held = group_holdout_split(groups, seed=seed)
            by_seed[seed].update(criteria_grid(ia, ta, groups, g_train, g_held, KS, PS, args.clusters, seed=seed))
            log(f"{text_name} seed {seed}: criteria over {len(grid)} settings in {time.perf_counter() - t:.0f} s "
                f"({len(g_held)} held-out captions of {len(np.unique(groups[g_held]))} images)")  # fmt: skip
        criteria = by_seed[args.seeds[0]]

        for test_name, (test, test_emb, truth) in tests.items():
            t = time.perf_counter()
            prompts = LabelSet(tuple(test.names), DEFAULT_TEMPLATES).prompts()
            label_emb = combine_prompt_embeddings(txt_enc.encode(prompts), len(test.names))
            if test_name not in test_neighbours:
                test_neighbours[test_name] = batched_topk(test_emb, ia, max(KS))
            sweep = DenseSweep.from_neighbours(test_neighbours[test_name], exact_topk(label_emb, ta, max(KS)))
            top1 = {kp: evaluate(sweep.scores(*kp), truth, test.names).top1 for kp in grid}
            best = choose(top1)
            run_out: dict = {
                "n_test": len(truth),
                "n_anchors": len(ia),
                "test_top1": {key(*kp): v for kp, v in top1.items()},
                "best": {"k": best[0], "p": best[1], "top1": top1[best]},
                "criteria": {},
            }
            for name, table in criteria.items():
                rho = rank_correlation(table, top1)
                pick = choose(table)
                run_out["criteria"][name] = {
                    "spearman": float(rho),
                    "chosen": {"k": pick[0], "p": pick[1]},
                    "top1_at_chosen": top1[pick],
                    "gap_points": 100 * (top1[best] - top1[pick]),
                    "values": {key(*kp): v for kp, v in table.items()},
                }
                if len(args.seeds) > 1:  # robustness: the pick on each seed's split, and of the mean over seeds
                    picks = [choose(by_seed[s][name]) for s in args.seeds]
                    mean = {kp: float(np.mean([by_seed[s][name][kp] for s in args.seeds])) for kp in grid}
                    pick = choose(mean)
                    run_out["criteria"][name]["seeds"] = {
                        "seeds": list(args.seeds),
                        "chosen": [{"k": k, "p": p} for k, p in picks],
                        "gap_points": [100 * (top1[best] - top1[kp]) for kp in picks],
                        "mean_over_seeds": {
                            "spearman": rank_correlation(mean, top1),
                            "chosen": {"k": pick[0], "p": pick[1]},
                            "gap_points": 100 * (top1[best] - top1[pick]),
                        },
                    }
            out["runs"][f"{test_name} {text_name}"] = run_out
            log(f"{test_name} {text_name}: test sweep in {time.perf_counter() - t:.0f} s")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def print_table(out: dict) -> None:
    runs = list(out["runs"])
    names = list(out["runs"][runs[0]]["criteria"])
    print("| criterion | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    best = [out["runs"][r]["best"] for r in runs]
    cells = [f"k={b['k']},p={b['p']:g}: {100 * b['top1']:.1f}" for b in best]
    print("| best test setting (labels) | " + " | ".join(cells) + " |")
    for name in names:
        cells = []
        for r in runs:
            c = out["runs"][r]["criteria"][name]
            cells.append(f"rho {c['spearman']:+.2f}; k={c['chosen']['k']},p={c['chosen']['p']:g}: "
                         f"{100 * c['top1_at_chosen']:.1f} (-{c['gap_points']:.1f})")  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")
    if len(out["seeds"]) < 2:
        return
    print(f"\nSeeds {out['seeds']}: the setting picked on each split (gap to the best), and on the mean over splits:\n")
    print("| criterion | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for name in names:
        cells = []
        for r in runs:
            s = out["runs"][r]["criteria"][name]["seeds"]
            pairs = zip(s["chosen"], s["gap_points"], strict=True)
            picks = ", ".join(f"{c['k']},{c['p']:g} (-{g:.1f})" for c, g in pairs)
            m = s["mean_over_seeds"]
            cells.append(f"{picks}; mean: rho {m['spearman']:+.2f}, {m['chosen']['k']},{m['chosen']['p']:g} "
                         f"(-{m['gap_points']:.1f})")  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", default="imagenette,cifar10", type=lambda s: s.split(","))
    ap.add_argument("--text-encoders", default="minilm,mpnet", type=lambda s: s.split(","))
    ap.add_argument("--image-encoder", default="effnet-lite0")
    ap.add_argument("--clusters", default="10,50", type=lambda s: [int(c) for c in s.split(",")])
    ap.add_argument(
        "--seeds",
        default="0,1,2",
        type=lambda s: [int(x) for x in s.split(",")],
        help="held-out splits and k-means seeds; the first makes the main table, the others a check",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = run(args)
    print_table(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    log(f"total {out['seconds']} s")


if __name__ == "__main__":
    main()
