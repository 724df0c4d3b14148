"""`asif eval --candidates`: training-free variants of the recipe against the default, on the same pairs, encoders
and seed (issue 17). Each candidate's own parameter is chosen without test labels, by the held-out caption retrieval
that ``--auto`` uses for k and p; the test top-1 of every grid value is reported beside the chosen one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from asif.evaluation import holdout_split, retrieval_at_1
from asif.relrep import KeyMatrix, Weighting, exact_topk, sparsify
from asif.variants import centre, hubness_weights


@dataclass(frozen=True)
class Candidate:
    name: str
    what: str
    weighting: str = "power"
    grid: tuple[float, ...] = ()  # the candidate's own parameter; () = none beyond k and p
    centre_image: bool = False
    centre_text: bool = False
    hubness: bool = False  # grid values are then the hubness neighbourhood size


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("default", "s^p after top-k (today's recipe)"),
    Candidate("centre", "both modalities centred on their mean anchor", centre_image=True, centre_text=True),
    Candidate("centre-image", "image modality centred on its mean anchor", centre_image=True),
    Candidate("hubness", "anchor weights x IDF of image k-occurrence", grid=(50.0, 200.0, 800.0), hubness=True),
    Candidate("softmax", "softmax over the top k at temperature t", weighting="softmax", grid=(0.01, 0.02, 0.05, 0.1)),
    Candidate("rank", "weights 1 / (rank + r0)", weighting="rank", grid=(1.0, 10.0, 50.0, 200.0)),
)
NAMES = tuple(c.name for c in CANDIDATES)


def check_names(names: list[str]) -> None:
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown candidates {unknown}; choose from {', '.join(NAMES)} (or all)")


def _scorer(
    cand: Candidate, image_anchors: np.ndarray, text_anchors: np.ndarray, images: np.ndarray, texts: np.ndarray,
    k: int, p: float,
) -> Callable[[float], np.ndarray]:  # fmt: skip
    """scores(parameter) of one candidate for these queries over one anchor set; the neighbours are searched once,
    only the weights depend on the parameter."""
    mean_i, mean_t = image_anchors.mean(axis=0), text_anchors.mean(axis=0)
    anchors_i = centre(image_anchors, mean_i) if cand.centre_image else image_anchors
    anchors_t = centre(text_anchors, mean_t) if cand.centre_text else text_anchors
    si, ii = exact_topk(centre(images, mean_i) if cand.centre_image else images, anchors_i, k)
    st, it = exact_topk(centre(texts, mean_t) if cand.centre_text else texts, anchors_t, k)

    def scores(param: float) -> np.ndarray:
        weights = hubness_weights(image_anchors, int(param)) if cand.hubness else None
        weighting = Weighting(cand.weighting, param if cand.weighting != "power" else p)
        img = sparsify(si, ii, weighting, weights)
        txt = sparsify(st, it, weighting, weights)
        return KeyMatrix.from_rr(txt).score(img)

    return scores


def run_candidates(
    names: list[str],
    test_images: np.ndarray,
    labels: np.ndarray,
    truth: np.ndarray,
    image_anchors: np.ndarray,
    text_anchors: np.ndarray,
    k: int,
    p: float,
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, dict]:
    """Test top-1 of each named candidate at its label-free choice (and at every grid value)."""
    check_names(names)
    train, held = holdout_split(len(image_anchors), seed=seed)
    out: dict[str, dict] = {}
    for cand in (c for c in CANDIDATES if c.name in names):
        log(f"candidate {cand.name}: {cand.what}")
        test_scores = _scorer(cand, image_anchors, text_anchors, test_images, labels, k, p)
        grid = cand.grid or (float("nan"),)
        per_value: dict[str, float] = {}
        retrieval: dict[str, float] = {}
        if len(grid) > 1:
            held_scores = _scorer(
                cand, image_anchors[train], text_anchors[train], image_anchors[held], text_anchors[held], k, p
            )
            for value in grid:
                retrieval[f"{value:g}"] = retrieval_at_1(held_scores(value))
        for value in grid:
            top1 = float((test_scores(value).argmax(axis=1) == truth).mean())
            per_value[f"{value:g}"] = top1
        chosen = max(retrieval, key=lambda v: retrieval[v]) if retrieval else f"{grid[0]:g}"
        out[cand.name] = {
            "what": cand.what,
            "parameter": chosen if cand.grid else None,
            "top1": per_value[chosen],
            "top1_per_parameter": per_value if cand.grid else None,
            "holdout_retrieval": retrieval or None,
        }
    return out
