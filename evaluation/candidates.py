"""`asif eval --candidates`: training-free variants of the recipe against the default, on the same pairs, encoders
and seed (issue 17). Each candidate's own parameter is chosen without test labels, by ``--auto``'s criterion
(:mod:`asif.tuning.autoselect`: whole images held out, the mean reciprocal rank of their own captions, 3 seeded splits);
the test top-1 of every grid value is reported beside the chosen one.

Families:
- the weighting of the top-k similarities (softmax, rank) and per-anchor corrections (centering, hubness);
- test-time augmentation: the query image's representation is the mean of its views' (flip, centre crop);
- prompt sets: CLIP's 80 ImageNet templates against the defaults, ensembled in embedding space (one
  representation of the mean prompt embedding) or in relative-representation space (the mean of the prompts'
  representations);
- anchor modes: one anchor per caption and one per image together, or caption anchors weighted by how much each
  caption agrees with its image's other captions;
- a per-label bias against labels that score high for every image (NNN-style; the grid is its weight alpha);
- a closed-form second scorer (orthogonal Procrustes) fused with ASIF's standardised scores (the grid is its weight).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from asif.math.normalise import l2_normalise
from asif.math.relrep import KeyMatrix, SparseRR, Weighting, average_relreps, sparsify
from asif.math.topk import exact_topk
from asif.math.variants import (
    bank_neighbours,
    centre,
    hubness_weights,
    nnn_bias,
    prior_balanced,
    procrustes_map,
    reference_bank,
    standardised,
)
from asif.serving.labels import combine_prompt_embeddings
from asif.tuning.autoselect import HoldOut, holdouts, image_keys, mean_reciprocal_rank


@dataclass(frozen=True)
class Candidate:
    name: str
    what: str
    weighting: str = "power"
    grid: tuple[float, ...] = ()  # the candidate's own parameter; () = none beyond k and p
    centre_image: bool = False
    centre_text: bool = False
    hubness: bool = False  # grid values are then the hubness neighbourhood size
    views: tuple[str, ...] = ()  # test-time augmentation: views averaged with the image
    views_in: str = "relrep"  # average the views' representations, or their embeddings ("embedding")
    prompts: str | None = None  # a prompt set of CandidateInputs.prompt_sets (None: the run's label embeddings)
    ensemble: str = "embedding"  # prompts combined in embedding space, or in representation space ("relrep")
    anchors: str = "primary"  # "both": the primary and the other anchor mode together; "agreement": weighted
    balance: bool = False  # grid values are then the temperature of the test batch's prior balancing
    nnn: bool = False  # grid values are then the weight alpha of the per-label bias
    procrustes: bool = False  # grid values are then the weight of the Procrustes scorer in the fusion


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("default", "s^p after top-k (today's recipe)"),
    Candidate("centre", "both modalities centred on their mean anchor", centre_image=True, centre_text=True),
    Candidate("centre-image", "image modality centred on its mean anchor", centre_image=True),
    Candidate("hubness", "anchor weights x IDF of image k-occurrence", grid=(50.0, 200.0, 800.0), hubness=True),
    Candidate("softmax", "softmax over the top k at temperature t", weighting="softmax", grid=(0.01, 0.02, 0.05, 0.1)),
    Candidate("rank", "weights 1 / (rank + r0)", weighting="rank", grid=(1.0, 10.0, 50.0, 200.0)),
    Candidate("tta", "mean representation of the image, its mirror and its centre crop", views=("flip", "crop")),
    Candidate("tta-flip", "mean representation of the image and its mirror", views=("flip",)),
    Candidate(
        "tta-embedding",
        "one representation of the mean embedding of the three views",
        views=("flip", "crop"),
        views_in="embedding",
    ),
    Candidate(
        "prompts-relrep", "the default prompts ensembled in representation space", prompts="default", ensemble="relrep"
    ),
    Candidate("clip80", "CLIP's 80 ImageNet templates, ensembled in embedding space", prompts="clip80"),
    Candidate(
        "clip80-relrep", "CLIP's 80 templates, ensembled in representation space", prompts="clip80", ensemble="relrep"
    ),
    Candidate("both-anchors", "one anchor per caption and one per image (mean caption) together", anchors="both"),
    Candidate(
        "agreement", "caption anchors weighted by agreement with the image's other captions", anchors="agreement"
    ),
    Candidate(
        "balance",
        "the test batch's predictions balanced to a uniform class prior (Sinkhorn, OTTER-style) at temperature t",
        grid=(0.005, 0.01, 0.02, 0.05),
        balance=True,
    ),
    Candidate(
        "nnn",
        "minus alpha x each label's mean score over its 64 best reference anchor images (NNN-style bias)",
        grid=(0.1, 0.25, 0.5, 0.75),
        nnn=True,
    ),
    Candidate(
        "procrustes",
        "standardised ASIF scores + w x standardised cosines of an orthogonal Procrustes map image -> text",
        grid=(0.1, 0.25, 0.5, 1.0),
        procrustes=True,
    ),
    Candidate(
        "softmax+tta",
        "softmax weighting (label-free t) with the three views",
        weighting="softmax",
        grid=(0.01, 0.02, 0.05, 0.1),
        views=("flip", "crop"),
    ),
)
NAMES = tuple(c.name for c in CANDIDATES)


@dataclass
class CandidateInputs:
    """What the candidates are computed from; the optional parts are filled when a named candidate needs them."""

    test_images: np.ndarray  # (n_test, d_image) embeddings
    labels: np.ndarray  # (n_classes, d_text) class embeddings (the run's templates, ensembled in embedding space)
    truth: np.ndarray  # (n_test,) class index
    image_anchors: np.ndarray
    text_anchors: np.ndarray
    views: dict[str, np.ndarray] = field(default_factory=dict)  # view name -> (n_test, d_image) embeddings
    prompt_sets: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n_classes, n_templates, d_text)
    other_anchors: tuple[np.ndarray, np.ndarray] | None = None  # the other anchor mode's (image, text) anchors
    anchor_groups: np.ndarray | None = None  # (n_anchors,) the image each anchor's caption describes


def needs(names: list[str]) -> dict[str, object]:
    """What the named candidates need beyond embeddings of the test images and labels."""
    chosen = [c for c in CANDIDATES if c.name in names]
    return {
        "views": tuple(dict.fromkeys(v for c in chosen for v in c.views)),
        "prompt_sets": tuple(dict.fromkeys(c.prompts for c in chosen if c.prompts)),
        "other_anchors": any(c.anchors == "both" for c in chosen),
        "anchor_groups": any(c.anchors == "agreement" for c in chosen),
    }


def check_names(names: list[str]) -> None:
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown candidates {unknown}; choose from {', '.join(NAMES)} (or all)")


def agreement_weights(text_anchors: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per caption anchor: cosine with the normalised mean of its image's other captions (floor 1e-3); 1 for an
    image with one caption."""
    groups = np.asarray(groups)
    out = np.ones(len(text_anchors), dtype=np.float32)
    uniq, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    sums = np.zeros((len(uniq), text_anchors.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, text_anchors.astype(np.float64))
    many = counts[inverse] > 1
    others = l2_normalise((sums[inverse] - text_anchors)[many].astype(np.float32))
    out[many] = np.maximum((others * text_anchors[many]).sum(axis=1), 1e-3)
    return out


def _group_relreps(rr: SparseRR, n_classes: int) -> SparseRR:
    """Class-major prompt representations (n_classes * T rows) -> per class, the mean over its T prompts."""
    t = len(rr) // n_classes
    return average_relreps([SparseRR(rr.ids[j::t].copy(), rr.weights[j::t].copy()) for j in range(t)])


def _scorer(
    cand: Candidate, inputs: CandidateInputs, images: list[np.ndarray], texts: np.ndarray, k: int, p: float,
    image_anchors: np.ndarray, text_anchors: np.ndarray, anchor_weights: np.ndarray | None,
) -> Callable[[float], np.ndarray]:  # fmt: skip
    """scores(parameter) of one candidate for these queries over one anchor set. ``images``: the query views (the
    image first); ``texts``: (n_keys, d) or (n_keys, n_prompts, d). The neighbours are searched once, only the
    weights depend on the parameter."""
    mean_i, mean_t = image_anchors.mean(axis=0), text_anchors.mean(axis=0)
    anchors_i = centre(image_anchors, mean_i) if cand.centre_image else image_anchors
    anchors_t = centre(text_anchors, mean_t) if cand.centre_text else text_anchors
    if cand.views_in == "embedding":
        images = [l2_normalise(np.mean(images, axis=0).astype(np.float32))]
    n_keys = len(texts)
    flat_texts = texts.reshape(-1, texts.shape[-1])
    if texts.ndim == 3 and cand.ensemble == "embedding":
        flat_texts = combine_prompt_embeddings(flat_texts, n_keys)
    image_nn = [exact_topk(centre(q, mean_i) if cand.centre_image else q, anchors_i, k) for q in images]
    st, it = exact_topk(centre(flat_texts, mean_t) if cand.centre_text else flat_texts, anchors_t, k)
    if cand.nnn:  # the reference bank: anchor images against the anchors without their own pairs
        groups = image_keys(anchors_i)  # rows holding the same image
        bank = bank_neighbours(anchors_i, groups, reference_bank(groups), k)
    if cand.procrustes:
        key_emb = flat_texts if len(flat_texts) == n_keys else combine_prompt_embeddings(flat_texts, n_keys)
        second = l2_normalise(images[0] @ procrustes_map(image_anchors, text_anchors)) @ key_emb.T

    def scores(param: float) -> np.ndarray:
        weights = hubness_weights(image_anchors, int(param)) if cand.hubness else anchor_weights
        weighting = Weighting(cand.weighting, param if cand.weighting != "power" else p)
        img = average_relreps([sparsify(s, i, weighting, weights) for s, i in image_nn])
        txt = sparsify(st, it, weighting, weights)
        if len(txt) != n_keys:
            txt = _group_relreps(txt, n_keys)
        key_matrix = KeyMatrix.from_rr(txt)
        raw = key_matrix.score(img)
        if cand.nnn:
            raw = raw - param * nnn_bias(key_matrix.score(sparsify(*bank, weighting, weights)))
        if cand.procrustes:
            raw = standardised(raw) + param * standardised(second)
        return prior_balanced(raw, param) if cand.balance else raw

    return scores


def _anchors(cand: Candidate, inputs: CandidateInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if cand.anchors == "both":
        if inputs.other_anchors is None:
            raise LookupError("needs both anchor modes (evaluate --pairs, not --index)")
        other_i, other_t = inputs.other_anchors
        return np.concatenate([inputs.image_anchors, other_i]), np.concatenate([inputs.text_anchors, other_t]), None
    if cand.anchors == "agreement":
        if inputs.anchor_groups is None:
            raise LookupError("needs the image of every caption anchor (evaluate --pairs with --anchors caption)")
        return inputs.image_anchors, inputs.text_anchors, agreement_weights(inputs.text_anchors, inputs.anchor_groups)
    return inputs.image_anchors, inputs.text_anchors, None


def candidate_scores(name: str, inputs: CandidateInputs, k: int, p: float, param: float | None = None) -> np.ndarray:
    """(n_test, n_classes) scores of one candidate at one value of its parameter (its first grid value if None)."""
    check_names([name])
    cand = next(c for c in CANDIDATES if c.name == name)
    image_a, text_a, weights = _anchors(cand, inputs)
    texts = inputs.prompt_sets[cand.prompts] if cand.prompts else inputs.labels
    images = [inputs.test_images, *(inputs.views[v] for v in cand.views)]
    scores = _scorer(cand, inputs, images, texts, k, p, image_a, text_a, weights)
    return scores(param if param is not None else (cand.grid or (float("nan"),))[0])


def run_candidates(
    names: list[str],
    inputs: CandidateInputs,
    k: int,
    p: float,
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, dict]:
    """Test top-1 of each named candidate at its label-free choice (and at every grid value)."""
    check_names(names)
    splits: list[HoldOut] | None = None  # made once, when a candidate has a parameter to choose
    out: dict[str, dict] = {}
    for cand in (c for c in CANDIDATES if c.name in names):
        log(f"candidate {cand.name}: {cand.what}")
        try:
            image_a, text_a, weights = _anchors(cand, inputs)
            missing = [v for v in cand.views if v not in inputs.views]
            if missing or (cand.prompts and cand.prompts not in inputs.prompt_sets):
                raise LookupError(f"needs the {missing or cand.prompts} embeddings")
        except LookupError as exc:
            out[cand.name] = {"what": cand.what, "skipped": str(exc)}
            continue
        texts = inputs.prompt_sets[cand.prompts] if cand.prompts else inputs.labels
        images = [inputs.test_images, *(inputs.views[v] for v in cand.views)]
        test_scores = _scorer(cand, inputs, images, texts, k, p, image_a, text_a, weights)
        grid = cand.grid or (float("nan"),)
        per_value: dict[str, float] = {}
        criterion: dict[str, float] = {}
        if len(grid) > 1:  # whole held-out images: no views or prompts, the candidate's weighting and anchor weights
            splits = splits or holdouts(image_keys(inputs.image_anchors), seed)
            held_cand = replace(
                cand, views=(), views_in="relrep", prompts=None, ensemble="embedding", anchors="primary"
            )
            for split in splits:
                held_scores = _scorer(
                    held_cand, inputs, [inputs.image_anchors[split.queries]], inputs.text_anchors[split.held], k, p,
                    inputs.image_anchors[split.train], inputs.text_anchors[split.train], None,
                )  # fmt: skip
                for value in grid:
                    mrr = mean_reciprocal_rank(held_scores(value), split.own) / len(splits)
                    criterion[f"{value:g}"] = criterion.get(f"{value:g}", 0.0) + mrr
        for value in grid:
            top1 = float((test_scores(value).argmax(axis=1) == inputs.truth).mean())
            per_value[f"{value:g}"] = top1
        chosen = max(criterion, key=lambda v: criterion[v]) if criterion else f"{grid[0]:g}"
        out[cand.name] = {
            "what": cand.what,
            "parameter": chosen if cand.grid else None,
            "top1": per_value[chosen],
            "top1_per_parameter": per_value if cand.grid else None,
            "holdout_mrr": criterion or None,
        }
    return out
