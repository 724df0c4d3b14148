"""Run an evaluation: embed (cached), sweep k/p exactly, compare the served path, baseline, anchors, auto k/p."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from asif.encoders import ImageEncoder, TextEncoder, load_image_encoder, load_text_encoder
from asif.encoders.embcache import EmbeddingCache
from asif.encoders.quantize import QUANTIZED_FILE, calibration_images, check_choice, quantize_image_encoder
from asif.math.relrep import Weighting
from asif.math.topk import exact_topk
from asif.serving.labels import DEFAULT_TEMPLATES, TEMPLATE_SETS, LabelSet, combine_prompt_embeddings
from asif.serving.loading import open_index
from asif.serving.model import AsifModel
from asif.stores import build_store, choose_index_spec, count_distinct_rows
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
    ridge_scores,
)
from evaluation.candidates import CandidateInputs, check_names, needs, run_candidates
from evaluation.config import EvalConfig
from evaluation.data import TestSet, content_hashes, load_test_set, read_templates
from evaluation.embed import AnchorSet, anchors_from_pairs, embed_image_files, embed_texts
from index_builder.pairs_io import read_pairs, resolve_image


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quantize_from_pairs(cfg: EvalConfig, img_enc: ImageEncoder) -> None:
    """``--quantize int8``: the image encoder quantised on the first distinct anchor images (``<out>/encoders``)."""
    assert cfg.pairs is not None and cfg.images_root is not None
    refs = dict.fromkeys(ref for ref, _ in read_pairs(cfg.pairs).rows)
    files = (f for f in (resolve_image(Path(cfg.images_root), r) for r in refs) if f is not None)
    images = calibration_images(files)
    quantize_image_encoder(img_enc, images, cfg.out / QUANTIZED_FILE)
    _log(f"image encoder quantised to int8 on {len(images)} anchor images")


def served_top1(
    model: AsifModel, test_emb: np.ndarray, label_emb: np.ndarray, names: list[str], k: int, p: float
) -> np.ndarray:
    labels = model.make_labels(LabelSet(tuple(names), ("{}",)), label_emb)
    pred = []
    for s in range(0, len(test_emb), 256):
        for pr in model.classify(test_emb[s : s + 256], labels, k=k, p=p, top=1):
            pred.append(names.index(pr.scores[0][0]) if not pr.unknown else -1)
    return np.array(pred)


def milvus_stores(cfg: EvalConfig, image: np.ndarray, text: np.ndarray) -> list[Any]:
    """The anchors in two fresh Milvus collections (``eval_image``, ``eval_text``), row i = id i."""
    from pymilvus import MilvusClient

    from asif.stores.milvus_store import MilvusIndex, MilvusStore, load_rows

    client = MilvusClient(cfg.milvus_uri or str(cfg.out / "milvus.db"))
    index = MilvusIndex.parse(cfg.milvus_index)
    stores = []
    for role, x in (("image", image), ("text", text)):
        if client.has_collection(f"eval_{role}"):
            client.drop_collection(f"eval_{role}")
        store = MilvusStore(client, f"eval_{role}", x.shape[1], index)
        with tqdm(total=len(x), desc=f"milvus {role}", unit="row", file=sys.stderr) as bar:
            load_rows(store, x, progress=bar.update)
        stores.append(store)
    return stores


def candidate_inputs(
    cfg: EvalConfig, test: TestSet, test_ok: np.ndarray, truth: np.ndarray, test_emb: np.ndarray,
    label_emb: np.ndarray, sets: dict[str, AnchorSet], primary: str, img_enc: ImageEncoder, txt_enc: TextEncoder,
    img_cache: EmbeddingCache, txt_cache: EmbeddingCache, prompt_emb: np.ndarray,
) -> CandidateInputs:  # fmt: skip
    """What the named candidates need: test image views, prompt sets (``prompt_emb``: the run's prompts, class-major,
    already embedded), the other anchor mode, caption groups."""
    main = sets[primary]
    wanted = needs(cfg.candidates)
    inputs = CandidateInputs(test_emb, label_emb, truth, main.image, main.text)
    for view in wanted["views"]:
        emb, _ = embed_image_files(test.files, img_enc, img_cache, f"test images ({view})", cfg.batch_size, view)
        inputs.views[view] = emb[test_ok]
    for name in wanted["prompt_sets"]:
        if name == "default":
            inputs.prompt_sets[name] = prompt_emb.reshape(len(test.names), -1, prompt_emb.shape[-1])
            continue
        chosen = TEMPLATE_SETS[name]
        emb = embed_texts(LabelSet(tuple(test.names), chosen).prompts(), txt_enc, txt_cache, f"prompts ({name})")
        inputs.prompt_sets[name] = emb.reshape(len(test.names), len(chosen), -1)
    others = [m for m in sets if m != primary]
    if wanted["other_anchors"] and others:
        inputs.other_anchors = (sets[others[0]].image, sets[others[0]].text)
    if wanted["anchor_groups"] and primary == "caption" and main.image_files:
        groups: dict[Path, int] = {}
        inputs.anchor_groups = np.array([groups.setdefault(f, len(groups)) for f in main.image_files])
    return inputs


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    check_names(cfg.candidates)  # before any embedding work
    cfg.out.mkdir(parents=True, exist_ok=True)
    test: TestSet = load_test_set(cfg.test, cfg.classes)
    if test.renamed:
        shown = ", ".join(f"{folder} -> {name!r}" for folder, name in list(test.renamed.items())[:10])
        _log(f"warning: {len(test.renamed)} class folders share a name; renamed: {shown} (set names with --classes)")
    templates = read_templates(cfg.templates) if cfg.templates else list(DEFAULT_TEMPLATES)
    loaded = None
    if cfg.store == "milvus" and cfg.index is not None:
        raise ValueError("--store milvus evaluates --pairs loaded into Milvus; an --index folder is FAISS's")
    if cfg.index is not None:
        if check_choice(cfg.quantize) != "none":
            raise ValueError("--quantize goes with --pairs; an --index runs the image encoder it was built with")
        loaded = open_index(cfg.index, device=cfg.device, runtime=cfg.runtime)
        img_enc, txt_enc = loaded.model.image_encoder, loaded.model.text_encoder
        assert img_enc is not None and txt_enc is not None
    else:
        if cfg.pairs is None or cfg.images_root is None:
            raise ValueError("give --index, or --pairs with --images-root")
        img_enc = load_image_encoder(cfg.image_encoder, cfg.device, cfg.batch_size, cfg.runtime)
        txt_enc = load_text_encoder(cfg.text_encoder, cfg.device, cfg.batch_size, cfg.runtime)
        if check_choice(cfg.quantize) == "int8":
            quantize_from_pairs(cfg, img_enc)
    img_cache = EmbeddingCache(img_enc.identity, cfg.cache_dir)
    txt_cache = EmbeddingCache(txt_enc.identity, cfg.cache_dir)

    test_emb, test_ok = embed_image_files(test.files, img_enc, img_cache, "test images", cfg.batch_size)
    truth = np.asarray(test.labels)[test_ok]
    test_emb = test_emb[test_ok]
    prompts = LabelSet(tuple(test.names), tuple(templates)).prompts()
    prompt_emb = txt_enc.encode(prompts)
    label_emb = combine_prompt_embeddings(prompt_emb, len(test.names))

    if loaded is not None:
        ids = loaded.model.image_store.ids()
        sets = {
            str(loaded.folder.manifest.get("anchors", "image")): AnchorSet(
                loaded.model.image_store.reconstruct(ids), loaded.model.text_store.reconstruct(ids), []
            )
        }
        primary = next(iter(sets))
    else:
        sets = anchors_from_pairs(cfg, img_enc, txt_enc, img_cache, txt_cache)
        primary = cfg.anchors
    main = sets[primary]
    n = len(main.image)
    overlap = len(content_hashes(test.files) & content_hashes(main.image_files)) if main.image_files else None
    if overlap:
        raise ValueError(f"{overlap} test images are also anchor images: the evaluation would not be zero-shot")
    report: dict[str, Any] = {
        "test_set": str(cfg.test),
        "n_test": len(truth),
        "unreadable_test_images": int((~test_ok).sum()),
        "classes": test.names,
        "renamed_classes": test.renamed,
        "templates": templates,
        "encoders": {"image": img_enc.identity.to_dict(), "text": txt_enc.identity.to_dict()},
        "anchors": primary,
        "n_pairs": n,
        "test_anchor_image_overlap": overlap,
        "k": cfg.k,
        "p": cfg.p,
    }

    # 1. Exact sweep over k and p, for every anchor mode available.
    k_max = max([*cfg.ks, cfg.k])
    report["anchor_modes"] = {}
    sweep_main: DenseSweep | None = None
    for mode, aset in sets.items():
        _log(f"exact sweep over k x p with {len(aset.image)} '{mode}' anchors")
        sweep = DenseSweep(test_emb, label_emb, aset.image, aset.text, k_max)
        table = {
            f"{k},{p:g}": float(evaluate(sweep.scores(k, p), truth, test.names).top1) for k in cfg.ks for p in cfg.ps
        }
        main_scores = sweep.scores(cfg.k, cfg.p)
        report["anchor_modes"][mode] = {
            "n_pairs": len(aset.image),
            "metrics": evaluate(main_scores, truth, test.names, cfg.threshold).to_dict(),
            "sweep_top1": table,
        }
        if mode == primary:
            sweep_main, dense_scores_main = sweep, main_scores
    assert sweep_main is not None
    dense_pred = predictions(dense_scores_main, cfg.threshold)
    report["metrics"] = report["anchor_modes"][primary]["metrics"]
    report["predictions"] = dense_pred.tolist()  # per readable test image, in file order (-1: unknown)
    report["confusion"] = confusion_matrix(truth, dense_pred, len(test.names)).tolist()

    # 2. The served path (the stores as built) against the dense exact reference.
    recall: float | None = None
    if loaded is not None:
        model = loaded.model
    elif cfg.store == "milvus":
        model = AsifModel(*milvus_stores(cfg, main.image, main.text), k=cfg.k, p=cfg.p)
    else:
        image_spec, text_spec = (
            choose_index_spec(
                n,
                x.shape[1],
                cfg.index_type,
                refine=cfg.rerank,
                rerank_factor=cfg.rerank_factor,
                distinct=count_distinct_rows(x),
            )
            for x in (main.image, main.text)
        )
        model = AsifModel(
            build_store(main.image, np.arange(n), image_spec),
            build_store(main.text, np.arange(n), text_spec),
            k=cfg.k,
            p=cfg.p,
        )
    if loaded is None:
        # Recall@k of the image index against exact search (store ids are the anchor rows here).
        probe = test_emb[: min(len(test_emb), 500)]
        _, got = model.image_store.search(probe, cfg.k)
        _, ref = exact_topk(probe, main.image, cfg.k)
        recall = recall_at_k(got, ref)
    _log(f"served path ({model.image_store.describe()['factory']}) vs dense reference")
    served = served_top1(model, test_emb, label_emb, test.names, cfg.k, cfg.p)
    served_acc = float((served == truth).mean())
    dense_acc = float((dense_pred == truth).mean())
    report["served"] = {
        "index": {"image": model.image_store.describe(), "text": model.text_store.describe()},
        "top1": served_acc,
        "dense_top1": dense_acc,
        "top1_agreement": float((served == dense_pred).mean()),
        "accuracy_difference_points": 100 * (served_acc - dense_acc),
        "image_recall_at_k": recall,
    }

    # 3. Accuracy vs number of pairs (nested seeded subsets).
    sizes = sorted({s for s in cfg.sizes if s < n} | {n})
    subsets = nested_subsets(n, sizes, cfg.seed)
    curve: dict[str, list[float]] = {f"k={k},p={p:g}": [] for k, p in cfg.curve}
    for size, sub in zip(sizes, subsets, strict=True):
        sw = DenseSweep(test_emb, label_emb, main.image[sub], main.text[sub], max(k for k, _ in cfg.curve))
        for k, p in cfg.curve:
            curve[f"k={k},p={p:g}"].append(float(evaluate(sw.scores(k, p), truth, test.names).top1))
        _log(f"pairs={size}: " + ", ".join(f"{name} {vals[-1]:.3f}" for name, vals in curve.items()))
    report["accuracy_vs_pairs"] = {"sizes": sizes, "seed": cfg.seed, "curves": curve}

    # 4. Trained baseline: ridge map image -> caption embedding, lambda chosen on held-out pairs.
    lam, lam_table = auto_ridge_lambda(main.image, main.text, [0.01, 0.1, 1.0, 10.0, 100.0], cfg.seed)
    w = fit_ridge(main.image, main.text, lam)
    report["ridge_baseline"] = {
        "lambda": lam,
        "lambda_holdout_retrieval": {str(k): v for k, v in lam_table.items()},
        "metrics": evaluate(ridge_scores(w, test_emb, label_emb), truth, test.names).to_dict(),
    }

    # 5. k and the weighting chosen without test labels; the test top-1 of every setting of the grid it chose from.
    if cfg.auto:
        grid = [Weighting("power", p) for p in cfg.ps] + [Weighting("softmax", t) for t in cfg.ts]
        try:
            choice = auto_kp(main.image, main.text, cfg.ks, grid, cfg.seed)
        except ValueError as exc:
            raise ValueError(f"--auto: {exc}") from None
        _log(f"auto: k={choice.k}, {choice.weighting.describe()} (held-out mrr {choice.score:.3f})")
        swept = report["anchor_modes"][primary]["sweep_top1"]  # the power settings' top-1, scored in step 1

        def top1_at(k: int, w: Weighting) -> float:
            if w.kind == "power" and f"{k},{w.param:g}" in swept:
                return swept[f"{k},{w.param:g}"]
            return float(evaluate(sweep_main.scores(k, w), truth, test.names).top1)

        grid_top1 = {f"{k},{w.describe()}": top1_at(k, w) for k, w in choice.table}
        best_key = max(grid_top1, key=grid_top1.get)
        report["auto"] = {
            "k": choice.k,
            "weighting": choice.weighting.to_dict(),
            "p": choice.weighting.param if choice.weighting.kind == "power" else None,
            **choice.entry(),
            "test_top1_at_auto": grid_top1[f"{choice.k},{choice.weighting.describe()}"],
            "best_test_setting": best_key,
            "best_test_top1": grid_top1[best_key],
            "test_top1": grid_top1,
        }
    # 6. Training-free variants of the recipe, on the same anchors, at the same k and p.
    if cfg.candidates:
        inputs = candidate_inputs(cfg, test, test_ok, truth, test_emb, label_emb, sets, primary, img_enc, txt_enc,
                                  img_cache, txt_cache, prompt_emb)  # fmt: skip
        report["candidates"] = run_candidates(cfg.candidates, inputs, cfg.k, cfg.p, cfg.seed, _log)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (cfg.out / "report.json").write_text(json.dumps(report, indent=2))
    from evaluation.report import write_markdown, write_plots

    if not write_plots(report, cfg.out):
        print('no plots: matplotlib is not installed (pip install "asif[eval]")', file=sys.stderr)
    write_markdown(report, cfg.out)
    return report
