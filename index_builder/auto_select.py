"""`asif build --auto`: choose the served k and weighting from the pairs being built, without labels.

The selection is :func:`asif.evaluation.auto_kp`'s (hold out up to 1,000 pairs, score the grid by held-out
image->caption retrieval@1 against the other pairs), with memory bounded as in the rest of the build: the shard files
are read twice more, once for the held-out pairs' vectors and once for their neighbours among the other anchors,
kept per query as the best ``max(ks)`` so far and merged shard by shard.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from asif.evaluation import AUTO_KS, AUTO_WEIGHTINGS, DenseSweep, choose_settings, holdout_split
from asif.relrep import Weighting, WeightingLike, effective_k, exact_topk, top_sorted
from index_builder.anchor_chunks import AnchorChunk, anchor_chunks, gather_rows
from index_builder.errors import BuildError

CRITERION = "held-out image->caption retrieval@1"
ROLES = ("image", "text")
Neighbours = tuple[np.ndarray, np.ndarray]  # (sims, pair ids), rows sorted by decreasing similarity


@dataclass(frozen=True)
class AutoChoice:
    k: int
    weighting: Weighting
    table: dict[tuple[int, Weighting], float]  # retrieval@1 per (k, weighting) of the grid
    held_out: int
    seed: int
    seconds: float = 0.0

    @property
    def score(self) -> float:
        return self.table[(self.k, self.weighting)]

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's ``auto``: how the defaults were chosen, with the whole table."""
        return {
            "criterion": CRITERION,
            "held_out": self.held_out,
            "seed": self.seed,
            "table": {f"{k},{w.describe()}": value for (k, w), value in self.table.items()},
        }


def _chunks(files: Sequence[Path], mode: str, desc: str) -> Iterator[AnchorChunk]:
    """The anchors shard by shard, with a progress bar on stderr."""
    with tqdm(total=len(files), desc=desc, unit="shard", file=sys.stderr) as bar:
        for _, chunk in anchor_chunks(files, mode):
            yield chunk
            bar.update(1)


def held_out_neighbours(
    files: Sequence[Path], mode: str, held: np.ndarray, k: int
) -> tuple[dict[str, np.ndarray], dict[str, Neighbours]]:
    """The held-out pairs' vectors per role (``held``: sorted pair ids), and each one's top-``k`` neighbours among
    the other anchors of its role (k capped at their number), streamed from the shard files in two passes."""
    queries = gather_rows(_chunks(files, mode, "auto: held-out pairs"), dict.fromkeys(ROLES, held))

    best: dict[str, Neighbours] = {
        role: (np.zeros((len(held), 0), np.float32), np.zeros((len(held), 0), np.int64)) for role in ROLES
    }
    for chunk in _chunks(files, mode, "auto: neighbours"):
        others = np.flatnonzero(~np.isin(chunk.ids, held))
        if not len(others):
            continue
        for role in ROLES:
            sims, rows = exact_topk(queries[role], chunk.vectors[role][others], k)
            ids = chunk.first_id + others[rows]
            best_s, best_i = best[role]
            merged_s, merged_i = np.concatenate([best_s, sims], axis=1), np.concatenate([best_i, ids], axis=1)
            best[role] = top_sorted(merged_s, merged_i, min(k, merged_s.shape[1]))
    return queries, best


def auto_select(
    files: Sequence[Path],
    mode: str,
    n_pairs: int,
    seed: int = 0,
    ks: Sequence[int] = AUTO_KS,
    weightings: Sequence[WeightingLike] = AUTO_WEIGHTINGS,
    log: TextIO = sys.stderr,
) -> AutoChoice:
    """The (k, weighting) of the grid with the best held-out retrieval@1 over the ``n_pairs`` anchors of the shard
    files, as :func:`asif.evaluation.auto_kp` picks it over the same anchors in memory."""
    t0 = time.perf_counter()
    _, held = holdout_split(n_pairs, seed=seed)
    n_train = n_pairs - len(held)
    if n_train < 1:
        raise BuildError(f"--auto needs more pairs: {n_pairs} leave none to search once {len(held)} are held out")
    print(f"auto: choosing k and the weighting on {len(held)} held-out pairs of {n_pairs} (seed {seed})", file=log)
    _, neighbours = held_out_neighbours(files, mode, held, effective_k(max(ks), n_train))
    sweep = DenseSweep.from_neighbours(neighbours["image"], neighbours["text"])
    (k, weighting), table = choose_settings(sweep, ks, weightings)
    return AutoChoice(k, weighting, table, len(held), seed, time.perf_counter() - t0)
