"""Label-free criteria for k and the weighting (issue 18) against test accuracy, on Flickr8k caption anchors.

For each run (Imagenette val / CIFAR-10 test x MiniLM / mpnet, effnet-lite0, one anchor per caption) and every setting
of ``--auto``'s grid (k x power p and softmax t): the test top-1 (exact sweep of the test images against the class
label embeddings, 7 default templates, as ``asif eval`` computes it) and the value of each criterion:

- the criterion before issue 18: held-out retrieval@1 of pair *rows* (10%, seed 0), over the whole grid;
- the one ``--auto`` ships now (:func:`asif.tuning.autoselect.auto_kp`: held-out images' mrr, mean over splits of seeds
  0-2), over the whole grid;
- the candidates of :mod:`asif.tuning.criteria` (images held out), on the power settings (the k x p sweep), per seed.

Reports per run and criterion the Spearman correlation with test top-1 across the k x p sweep (and across the whole
grid where the criterion covers it), the setting each picks (ties: smaller k, then the earlier weighting), its test
top-1 and the gap to the best test top-1 over the same grid.

Embeddings come from the evaluation's cache (``evaluation.run``), so a run after ``asif eval`` encodes nothing but the
70 prompts.

    python bench/criteria.py --json bench/criteria_results.json     # ~10 min on 2 cores, 3 seeds
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

from asif.encoders import load_image_encoder, load_text_encoder
from asif.encoders.embcache import EmbeddingCache
from asif.math.relrep import Weighting
from asif.math.topk import exact_topk
from asif.serving.labels import DEFAULT_TEMPLATES, LabelSet, combine_prompt_embeddings
from asif.tuning.autoselect import AUTO_KS, AUTO_WEIGHTINGS, auto_kp, best_setting, group_holdout_split, image_keys
from asif.tuning.criteria import criteria_grid
from asif.tuning.metrics import DenseSweep, evaluate, holdout_split, retrieval_at_1
from evaluation.config import EvalConfig
from evaluation.data import load_test_set
from evaluation.embed import anchors_from_pairs, embed_image_files

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TESTS = {
    "imagenette": (DATA / "imagenette" / "val", DATA / "imagenette" / "classes.tsv"),
    "cifar10": (DATA / "cifar10" / "test", None),
}
GRID = [(k, w) for k in AUTO_KS for w in AUTO_WEIGHTINGS]  # --auto's, k ascending then the weightings in order
POWER = [(k, w) for k, w in GRID if w.kind == "power"]  # the k x p sweep
BEFORE = "before: retrieval@1 (rows held out)"
SHIPPED = "--auto now: mrr (images held out), mean over seeds 0-2"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def batched_topk(queries: np.ndarray, anchors: np.ndarray, k: int, batch: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """exact_topk in query batches (bounded memory); same rows as one call."""
    parts = [exact_topk(queries[s : s + batch], anchors, k) for s in range(0, len(queries), batch)]
    return np.concatenate([s for s, _ in parts]), np.concatenate([i for _, i in parts])


def key(k: int, w: Weighting) -> str:
    return f"{k},{w.describe()}"


def rank_correlation(table: dict, top1: dict, settings: list) -> float:
    """Spearman correlation of a criterion's values with the test top-1 over ``settings``."""
    return float(spearmanr([table[kw] for kw in settings], [top1[kw] for kw in settings]).statistic)


def judge(table: dict, top1: dict) -> dict:
    """A criterion against the test top-1: Spearman over the k x p sweep (and over the whole grid where the table
    covers it), its pick over the settings it covers and the gap to the best of those."""
    settings = [kw for kw in GRID if kw in table]
    pick, best = best_setting(table, settings), best_setting(top1, settings)
    out = {"spearman": rank_correlation(table, top1, POWER)}
    if len(settings) > len(POWER):
        out["spearman_whole_grid"] = rank_correlation(table, top1, settings)
    return {
        **out,
        "chosen": key(*pick),
        "top1_at_chosen": top1[pick],
        "best": key(*best),
        "gap_points": 100 * (top1[best] - top1[pick]),
    }


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    img_enc = load_image_encoder(args.image_encoder, None, 32)
    img_cache = EmbeddingCache(img_enc.identity)
    tests = {}
    for name in args.tests:
        test = load_test_set(*TESTS[name])
        emb, ok = embed_image_files(test.files, img_enc, img_cache, f"{name} images", 32)
        tests[name] = (test, emb[ok], np.asarray(test.labels)[ok])
    out: dict = {"grid": [key(*kw) for kw in GRID], "seeds": list(args.seeds), "runs": {}}
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
        groups = image_keys(ia)  # as --auto groups rows: by the content of the image vector
        log(f"{text_name}: {len(ia)} caption anchors of {len(np.unique(groups))} distinct images")

        # The criteria do not depend on the test set.
        t = time.perf_counter()
        train, held = holdout_split(len(ia), seed=args.seeds[0])
        before = DenseSweep(ia[held], ta[held], ia[train], ta[train], max(AUTO_KS))
        criteria = {BEFORE: {kw: retrieval_at_1(before.scores(*kw)) for kw in GRID}}
        criteria[SHIPPED] = auto_kp(ia, ta, AUTO_KS, AUTO_WEIGHTINGS, seed=args.seeds[0], splits=3).table
        log(f"{text_name}: before and shipped criteria over {len(GRID)} settings in {time.perf_counter() - t:.0f} s")
        by_seed: dict[int, dict[str, dict]] = {}
        for seed in args.seeds:
            t = time.perf_counter()
            g_train, g_held = group_holdout_split(groups, seed=seed)
            ws = [w for w in AUTO_WEIGHTINGS if w.kind == "power"]
            by_seed[seed] = criteria_grid(ia, ta, groups, g_train, g_held, AUTO_KS, ws, args.clusters, seed=seed)
            log(f"{text_name} seed {seed}: candidate criteria over {len(POWER)} settings in "
                f"{time.perf_counter() - t:.0f} s ({len(g_held)} held-out captions of "
                f"{len(np.unique(groups[g_held]))} images)")  # fmt: skip
        names = list(by_seed[args.seeds[0]])
        for name in names:
            criteria[f"{name} (seed {args.seeds[0]})"] = by_seed[args.seeds[0]][name]
            if len(args.seeds) > 1:
                mean = {kw: float(np.mean([by_seed[s][name][kw] for s in args.seeds])) for kw in POWER}
                criteria[f"{name} (mean over seeds {','.join(map(str, args.seeds))})"] = mean

        for test_name, (test, test_emb, truth) in tests.items():
            t = time.perf_counter()
            prompts = LabelSet(tuple(test.names), DEFAULT_TEMPLATES).prompts()
            label_emb = combine_prompt_embeddings(txt_enc.encode(prompts), len(test.names))
            if test_name not in test_neighbours:
                test_neighbours[test_name] = batched_topk(test_emb, ia, max(AUTO_KS))
            sweep = DenseSweep.from_neighbours(test_neighbours[test_name], exact_topk(label_emb, ta, max(AUTO_KS)))
            top1 = {kw: evaluate(sweep.scores(*kw), truth, test.names).top1 for kw in GRID}
            best, best_power = best_setting(top1, GRID), best_setting(top1, POWER)
            run_out: dict = {
                "n_test": len(truth),
                "n_anchors": len(ia),
                "test_top1": {key(*kw): v for kw, v in top1.items()},
                "best": {"setting": key(*best), "top1": top1[best]},
                "best_power": {"setting": key(*best_power), "top1": top1[best_power]},
                "criteria": {
                    name: {**judge(table, top1), "values": {key(*kw): v for kw, v in table.items()}}
                    for name, table in criteria.items()
                },
            }
            out["runs"][f"{test_name} {text_name}"] = run_out
            log(f"{test_name} {text_name}: test sweep in {time.perf_counter() - t:.0f} s")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def print_table(out: dict) -> None:
    """One row per criterion: Spearman over the k x p sweep (/ over the whole grid), pick, its top-1 and gap."""
    runs = list(out["runs"])
    print("| criterion | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for label, field in (("best of the whole grid (test labels)", "best"), ("best power setting", "best_power")):
        cells = [f"{out['runs'][r][field]['setting']}: {100 * out['runs'][r][field]['top1']:.1f}" for r in runs]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for name in out["runs"][runs[0]]["criteria"]:
        cells = []
        for r in runs:
            c = out["runs"][r]["criteria"][name]
            whole = f" / {c['spearman_whole_grid']:+.2f}" if "spearman_whole_grid" in c else ""
            rho = f"{c['spearman']:+.2f}{whole}"
            cells.append(f"rho {rho}; {c['chosen']}: {100 * c['top1_at_chosen']:.1f} (-{c['gap_points']:.1f})")
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
