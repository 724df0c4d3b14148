"""Evaluation metrics on small cases with known answers, and the exactness of the k/p sweep."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from asif.math.relrep import Weighting
from asif.tuning.autoselect import auto_kp
from asif.tuning.metrics import (
    DenseSweep,
    auto_ridge_lambda,
    confusion_matrix,
    evaluate,
    fit_ridge,
    nested_subsets,
    predictions,
    recall_at_k,
    retrieval_at_1,
    ridge_scores,
    topk_accuracy,
)
from tests import reference
from tests.conftest import random_unit, write_pair_collection

SCORES = np.array(
    [
        [0.9, 0.1, 0.0],  # true 0 -> right
        [0.2, 0.3, 0.5],  # true 1 -> wrong (2), top-2 right
        [0.0, 0.0, 0.0],  # true 2 -> unknown (nothing shared)
        [0.1, 0.6, 0.3],  # true 1 -> right
    ]
)
TRUTH = np.array([0, 1, 2, 1])


def test_known_metrics():
    assert topk_accuracy(SCORES, TRUTH, 1) == 0.5
    assert topk_accuracy(SCORES, TRUTH, 2) == 0.75
    assert topk_accuracy(SCORES, TRUTH, 3) == 1.0
    assert predictions(SCORES).tolist() == [0, 2, -1, 1]
    assert predictions(SCORES, threshold=0.55).tolist() == [0, -1, -1, 1]
    m = evaluate(SCORES, TRUTH, ["a", "b", "c"])
    assert m.top1 == 0.5 and m.unknown_share == 0.25 and m.n == 4
    assert m.per_class == {"a": 1.0, "b": 0.5, "c": 0.0}
    m = evaluate(SCORES, TRUTH, ["a", "b", "c"], threshold=0.55)
    assert m.top1 == 0.5 and m.unknown_share == 0.5
    conf = confusion_matrix(TRUTH, predictions(SCORES), 3)
    assert conf.tolist() == [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]]


def test_nested_subsets_are_nested_and_seeded():
    subs = nested_subsets(100, [10, 30, 100, 500], seed=3)
    assert [len(s) for s in subs] == [10, 30, 100, 100]
    assert set(subs[0]) <= set(subs[1]) <= set(subs[2])
    again = nested_subsets(100, [10, 30], seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(subs, again, strict=False))
    assert not np.array_equal(nested_subsets(100, [10], seed=4)[0], subs[0])


def test_sweep_equals_dense_reference(rng):
    ia, ta = random_unit(rng, 500, 16), random_unit(rng, 500, 12)
    qi, qt = random_unit(rng, 20, 16), random_unit(rng, 6, 12)
    sweep = DenseSweep(qi, qt, ia, ta, k_max=200)
    for k, p in [(10, 1.0), (50, 8.0), (200, 2.0)]:
        np.testing.assert_allclose(sweep.scores(k, p), reference.scores(qi, qt, ia, ta, k, p), atol=1e-5)


def test_ridge_recovers_a_linear_map(rng):
    x = rng.standard_normal((400, 10))
    w_true = rng.standard_normal((10, 6))
    w = fit_ridge(x.astype(np.float32), (x @ w_true).astype(np.float32), lam=1e-6)
    np.testing.assert_allclose(w, w_true, atol=1e-3)
    texts = random_unit(rng, 5, 6)
    images = np.linalg.lstsq(w_true.T, texts.T, rcond=None)[0].T.astype(np.float32)  # x such that x W = text
    assert (np.argmax(ridge_scores(w, images, texts), axis=1) == np.arange(5)).all()
    lam, table = auto_ridge_lambda(x.astype(np.float32), (x @ w_true).astype(np.float32), [1e-3, 1e4])
    assert lam == 1e-3 and table[1e-3] > table[1e4]


def test_retrieval_and_auto_kp_prefer_the_informative_setting(small_world):
    assert retrieval_at_1(np.eye(4) + 0.1) == 1.0
    assert retrieval_at_1(np.ones((4, 4)) - np.eye(4)) == 0.0
    data = small_world.pairs(2000)
    choice = auto_kp(data.image_anchors, data.text_anchors, [1, 100], [8.0])
    assert choice.k == 100 and choice.table[(100, Weighting("power", 8.0))] > choice.table[(1, Weighting("power", 8.0))]


@pytest.mark.slow
def test_eval_command_on_a_tiny_collection(tmp_path, capsys, monkeypatch):
    """`asif eval` end to end on generated colour images: tables, JSON and plots are written."""
    from cli.main import main
    from tests.conftest import COLOURS

    images, pairs = write_pair_collection(tmp_path / "pairs", n_per_colour=6)
    for colour, rgb in COLOURS.items():
        folder = tmp_path / "test" / colour
        folder.mkdir(parents=True)
        for j in range(3):
            Image.new("RGB", (40, 40), tuple(min(255, c + 10 * j) for c in rgb)).save(folder / f"{j}.png")
    (tmp_path / "templates.txt").write_text("a {} square\n")
    monkeypatch.setenv("ASIF_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = [
        "eval",
        "--test",
        str(tmp_path / "test"),
        "--pairs",
        str(pairs),
        "--images-root",
        str(images),
        "--image-encoder",
        "effnet-lite0",
        "--text-encoder",
        "minilm",
        "--out",
        str(out),
        "--templates",
        str(tmp_path / "templates.txt"),
        "--k",
        "5",
        "--ks",
        "3,5",
        "--ps",
        "1,8",
        "--sizes",
        "8,16",
        "--auto",
    ]
    assert main([*args, "--candidates", "all"]) == 0
    printed = capsys.readouterr().out
    assert "ridge baseline" in printed and "Accuracy vs pairs" in printed and "Training-free variants" in printed
    report = json.loads((out / "report.json").read_text())
    from evaluation.candidates import NAMES

    assert tuple(report["candidates"]) == NAMES
    assert not [name for name, c in report["candidates"].items() if "skipped" in c]  # --pairs gives every input
    auto = report["auto"]
    assert auto["weighting"]["kind"] in ("power", "softmax") and auto["seeds"] == [0, 1, 2]
    assert len(auto["table"]) == len(auto["test_top1"]) == 2 * (2 + 4)  # ks x (ps + the softmax temperatures)
    chosen = f"{auto['k']},{Weighting(**auto['weighting']).describe()}"
    assert auto["table"][chosen] == max(auto["table"].values())
    assert auto["test_top1_at_auto"] == auto["test_top1"][chosen]
    assert auto["best_test_top1"] == max(auto["test_top1"].values()) == auto["test_top1"][auto["best_test_setting"]]
    assert "held-out images' mrr" in (out / "report.md").read_text()
    from evaluation.compare import table

    side_by_side = table([report, report]).splitlines()
    assert side_by_side[0].count(" minilm |") == 2 and len(side_by_side) == 2 + len(NAMES) + 2
    tta = 100 * report["candidates"]["tta"]["top1"]
    tta_delta = tta - 100 * report["candidates"]["default"]["top1"]
    cell = f"{tta:.1f} ({tta_delta:+.1f})"
    assert side_by_side[2 + NAMES.index("tta")] == f"| tta | {cell} | {cell} |"
    assert report["candidates"]["default"]["top1"] == report["metrics"]["top1"]  # the same recipe, computed apart
    assert main([*args, "--candidates", "centre,nope", "--out", str(tmp_path / "out_nope")]) == 2
    assert "unknown candidates ['nope']" in capsys.readouterr().err
    assert report["n_test"] == 12 and report["n_pairs"] == 48 and report["anchors"] == "caption"  # the default
    assert set(report["anchor_modes"]) == {"image", "caption"} and report["anchor_modes"]["image"]["n_pairs"] == 24
    assert report["accuracy_vs_pairs"]["sizes"] == [8, 16, 48]
    assert report["served"]["top1_agreement"] == 1.0  # flat index: identical to the dense reference
    assert report["test_anchor_image_overlap"] == 0
    for name in ("report.md", "accuracy_vs_pairs.png", "confusion.png"):
        assert (out / name).stat().st_size > 0
    # Second run: the embeddings come from the cache (no image is encoded again).
    from asif.encoders import load_image_encoder
    from asif.encoders.embcache import EmbeddingCache, file_key

    cache = EmbeddingCache(load_image_encoder("effnet-lite0").identity, tmp_path / "cache" / "embeddings")
    found, _ = cache.get([file_key(p) for p in sorted((tmp_path / "test").rglob("*.png"))])
    assert found.all()
    # The served path over the Milvus store (milvus-lite, FLAT): exact, like the dense reference.
    assert main([*args, "--store", "milvus", "--out", str(tmp_path / "out_milvus")]) == 0
    served = json.loads((tmp_path / "out_milvus" / "report.json").read_text())["served"]
    assert served["index"]["image"]["backend"] == "milvus" and served["index"]["image"]["type"] == "FLAT"
    assert served["top1_agreement"] == 1.0 and served["image_recall_at_k"] == 1.0
    assert (tmp_path / "out_milvus" / "milvus.db").exists()
    assert main([*args, "--store", "milvus", "--index", str(out)]) == 2
    assert "an --index folder is FAISS's" in capsys.readouterr().err
    assert main([*args, "--rerank", "SQ9", "--out", str(tmp_path / "out_bad")]) == 2
    assert "unknown re-ranking store 'SQ9'" in capsys.readouterr().err


def test_recall_at_k_counts_the_share_of_true_neighbours_found():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 1], [0, 0, 0, 0]])  # 3 of 4, then none
    assert recall_at_k(found, truth) == pytest.approx((0.75 + 0.0) / 2)


@pytest.mark.slow
def test_eval_at_a_thousand_classes_stays_small_and_writes_every_file(tmp_path):
    """Issue 18: a 1,000-class test set (fast test encoders) runs end to end under 2 GB with every output written,
    a bounded confusion figure, the top confusions listed, and two folders sharing a class name renamed."""
    import subprocess
    import sys

    images, pairs = write_pair_collection(tmp_path / "pairs", n_per_colour=20)
    rng = np.random.default_rng(0)
    test = tmp_path / "test"
    names = []
    for c in range(1000):
        (test / f"n{c:04d}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(test / f"n{c:04d}" / "0.png")
        names.append("crane" if c in (17, 517) else f"thing {c}")
    (tmp_path / "classes.tsv").write_text("".join(f"n{c:04d}\t{n}\n" for c, n in enumerate(names)))
    out = tmp_path / "out"
    # The peak of this process's own memory (VmHWM): getrusage's ru_maxrss would also count the pytest parent's
    # RSS at fork time, which Linux carries across exec.
    code = (
        "import re, sys; from cli.main import main; rc = main(sys.argv[1:]); "
        "print('PEAK_KB', re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(rc)"
    )
    args = ["eval", "--test", str(test), "--classes", str(tmp_path / "classes.tsv"), "--pairs", str(pairs),
            "--images-root", str(images), "--image-encoder", "py:tests.conftest:PixelEncoder",
            "--text-encoder", "py:tests.conftest:HashTextEncoder", "--out", str(out), "--auto"]  # fmt: skip
    env = {**os.environ, "ASIF_PLUGIN_ENCODERS": "1", "ASIF_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    peak_mb = int(run.stdout.split("PEAK_KB")[-1]) / 1024
    assert peak_mb < 2048, f"peak RSS {peak_mb:.0f} MB"
    for name in ("report.json", "report.md", "confusion.png", "accuracy_vs_pairs.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert len(report["classes"]) == 1000 and report["n_test"] == 1000
    assert report["renamed_classes"] == {"n0017": "crane (n0017)", "n0517": "crane (n0517)"}
    assert "n0017 -> 'crane (n0017)'" in run.stderr
    width, height = Image.open(out / "confusion.png").size
    assert width <= 17 * 120 and height <= 16 * 120  # inches x dpi: bounded at any number of classes
    md = (out / "report.md").read_text()
    assert "Top confusions" in md and "most confused" not in md  # the figure's subset is named in the plot only
    assert len(md) < 100_000
