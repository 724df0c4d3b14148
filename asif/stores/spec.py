"""Index choice for the FAISS store.

Index choice (``choose_index_spec``), the documented rule:

- ``flat``: exact inner-product search (``IDMap2,Flat``). Used for ``auto`` when n <= 50,000.
- ``ivfpq``: ``IVF{nlist},PQ{M}x4fs`` (FAISS's SIMD "fast-scan" PQ with 4-bit codes) with
  ``nlist = clamp(power of two nearest 2*sqrt(n), 16, 65536)`` (half FAISS's usual 4*sqrt(n):
  k=800 neighbours spread over many lists, and fewer, longer lists need fewer probes), also at most n/39 so every
  centroid gets FAISS's minimum of 39 training points; ``M`` = the divisor of the dimension
  nearest to dim/8 (8 dimensions per 4-bit sub-quantiser: 80 bytes for 1280-d, 24 for 384-d,
  48 for 768-d, the same bytes as 8-bit PQ with half as many sub-quantisers). At 100k clustered
  1280-d vectors, fast-scan scans ~3x faster than ``PQ80x8`` and ranks better (PQ-only recall@800
  0.87 vs 0.82). Trained on a seeded sample of ``max(64*nlist, 30000)`` vectors (at most n).
  ``nprobe`` is at least nlist/8, enough lists to hold 4x the candidates wanted and 131,072 vectors.
  By default the candidates are re-ranked exactly: ``max(rerank_factor * k', 4096)`` candidates (k' = the
  distinct vectors k pairs span, see below) come from
  the PQ codes, their exact inner products are computed from a refine store
  (a table of the float32 vectors by id, or float16 with ``SQfp16``), and the best ``k`` are kept, so
  the similarities raised to ``p`` are the true ones.
- any other string is a FAISS ``index_factory`` string used as given (inner product metric).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from asif.stores.base import StoreError
from asif.stores.vectors import DTYPES, make_codec

FLAT_MAX_N = 50_000
FLAT_GROUP_SHARE = 0.8  # a Flat index groups identical vectors when they are at most this share of the pairs
RERANK_FACTOR = 5.0  # candidates re-ranked per neighbour kept (docs/build.md, "Index choice")
TRAIN_MIN = 30_000


@dataclass(frozen=True)
class IndexSpec:
    """How an anchor index is built and searched; stored in the manifest."""

    kind: str  # "flat", "ivfpq" or "factory"
    factory: str  # FAISS index_factory string
    refine: str | None = None  # factory string of the exact re-ranking store, or None
    nprobe: int = 1  # minimum lists probed per search (IVF only)
    rerank_factor: float = 1.0  # candidates fetched per neighbour kept, when refining
    train_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def _nearest_divisor(dim: int, target: float) -> int:
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: (abs(m - target), m))


def ivfpq_params(n: int, dim: int) -> tuple[int, int]:
    """(nlist, M) for an IVF-PQ index over n vectors of the given dimension (see module doc)."""
    target = 2.0 * math.sqrt(max(n, 1))
    nlist = 2 ** round(math.log2(target))
    nlist = max(16, min(65536, nlist, max(1, n // 39)))
    m = _nearest_divisor(dim, max(dim / 8, min(dim, 4)))  # >= 4 sub-quantisers for tiny test dims
    return int(nlist), int(m)


def choose_index_spec(
    n: int,
    dim: int,
    index_type: str = "auto",
    refine: str | None = "Flat",
    rerank_factor: float = RERANK_FACTOR,
    distinct: int | None = None,
) -> IndexSpec:
    """Pick the index for n anchors of dimension dim. ``index_type``: auto, flat, ivfpq or a factory string.

    ``distinct``: how many distinct vectors the n anchors hold (one image, several captions). With re-ranking
    the store indexes each once, so the IVF lists are sized for them; ``auto`` still decides on n.
    """
    if not 1.0 <= rerank_factor <= 100.0:
        raise StoreError(f"rerank_factor must be in [1, 100], got {rerank_factor}")
    if refine and refine not in DTYPES:
        try:
            make_codec(dim, refine)  # a bad kind fails here, before any embedding work
        except ValueError as exc:
            raise StoreError(str(exc)) from exc
    kind = index_type.strip()
    if kind.lower() == "auto":
        kind = "flat" if n <= FLAT_MAX_N else "ivfpq"
    if kind.lower() == "flat":
        # Identical vectors (one image, several captions) are indexed once and their pairs expanded after the
        # search, which then scans the distinct vectors only (5x fewer with Flickr8k's per-caption anchors).
        # Grouping needs the exact float32 table beside the index: worth it when it saves a fifth of the scan.
        grouped = distinct is not None and distinct <= FLAT_GROUP_SHARE * n
        return IndexSpec(kind="flat", factory="IDMap2,Flat", refine="Flat" if grouped else None)
    if kind.lower() == "ivfpq":
        nlist, m = ivfpq_params(distinct if refine and distinct else n, dim)
        return IndexSpec(
            kind="ivfpq",
            factory=f"IVF{nlist},PQ{m}x4fs",
            refine=refine,
            nprobe=max(1, nlist // 8),
            rerank_factor=rerank_factor if refine else 1.0,
            train_size=int(min(n, max(64 * nlist, TRAIN_MIN))),
        )
    return IndexSpec(
        kind="factory",
        factory=kind,
        refine=refine if kind.upper().startswith("IVF") and "PQ" in kind.upper() else None,
        nprobe=16,
        rerank_factor=rerank_factor if refine else 1.0,
        train_size=int(min(n, TRAIN_MIN * 4)),
    )
