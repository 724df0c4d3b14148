"""The Milvus anchor store: anchor vectors in a Milvus collection (a Milvus server, or milvus-lite embedded).

It implements ``asif.stores.base.VectorStore``, so the ASIF math runs unchanged over it. One collection per role
(image anchors, caption anchors): ``id`` INT64 primary key (the pair id) and ``vec`` FLOAT_VECTOR, inner product.

- **Index type** (``MilvusIndex``): ``FLAT`` (exact; the default), ``IVF_FLAT`` and ``HNSW`` (approximate
  recall, exact distances for what they find), or a quantised type (``IVF_SQ8``, ``HNSW_SQ``; on servers
  ``IVF_PQ``, ``IVF_RABITQ``, ``DISKANN``...) whose candidates are re-ranked here on their stored float vectors, so
  the similarities raised to ``p`` are always true inner products. milvus-lite 3.2 honours FLAT, IVF_FLAT, IVF_SQ8,
  HNSW and HNSW_SQ, but builds 128 IVF lists whatever ``nlist`` says (set ``nprobe`` against 128 there).
- **Reads are Strong**: every search and query passes ``consistency_level="Strong"``, so a pair deleted through
  another client (another API replica) is never returned once its delete was acknowledged.
- **Ties at the k-th place go to the smallest ids**, as in the FAISS store and the dense reference: Milvus orders
  equal distances arbitrarily, so ``TIE_MARGIN`` more neighbours are fetched, and a row whose last one is still in
  the k-th one's similarity cell is fetched again with twice as many.
- **Limits**: Milvus servers cap ``topk`` (and ``nq``) at 16,384: a larger k is refused up front.
- Hits carry only ids (``output_fields=["id"]``): returning every field makes a search 4-5x slower.
- Bulk adds (``FLUSH_AT`` rows or more) are flushed into sealed, indexed segments: milvus-lite searches rows still
  in growing segments about 30x slower (1.9 s instead of 55 ms for k=800 over 10k 1280-d anchors).
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from asif.math.topk import TIE_GRID, TIE_MARGIN, effective_k, top_sorted
from asif.stores.base import StoreError, as_matrix, checked_new

TOPK_MAX = 16_384  # Milvus servers' cap on topk and nq
EXACT_TYPES = {"FLAT"}
DISTANCE_EXACT_TYPES = {"FLAT", "IVF_FLAT", "HNSW", "GPU_IVF_FLAT", "GPU_BRUTE_FORCE"}  # distances are true IPs
CHUNK = 1_000  # ids per query expression, rows per insert
FLUSH_AT = 1_000  # an add of this many rows is flushed: milvus-lite searches unflushed rows ~30x slower
STRONG = "Strong"


class _LiteTimestampNoise(logging.Filter):
    """milvus-lite's embedded gRPC server logs a traceback each time pymilvus asks it for a timestamp (for Strong
    reads), a call lite does not implement and pymilvus does without: drop those records, keep every other."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is NotImplementedError:
            return "AllocTimestamp" not in "".join(traceback.format_exception(*record.exc_info))
        return True


logging.getLogger("grpc._server").addFilter(_LiteTimestampNoise())


@dataclass(frozen=True)
class MilvusIndex:
    """Milvus index type and its build / search parameters."""

    type: str = "FLAT"
    build: dict[str, Any] = field(default_factory=dict)  # e.g. {"nlist": 1024} or {"M": 16, "efConstruction": 200}
    search: dict[str, Any] = field(default_factory=dict)  # e.g. {"nprobe": 64} or {"ef": 1024}
    rerank_factor: float = 4.0  # quantised types: candidates re-ranked per neighbour kept

    @classmethod
    def parse(cls, spec: str) -> MilvusIndex:
        """``"FLAT"``, ``"IVF_FLAT:nlist=1024,nprobe=64"``, ``"HNSW:M=16,efConstruction=200,ef=1024"``."""
        name, _, rest = spec.partition(":")
        build: dict[str, Any] = {}
        search: dict[str, Any] = {}
        for item in filter(None, (x.strip() for x in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise StoreError(f"Milvus index option {item!r} is not key=value")
            number: Any = float(value) if "." in value else int(value)
            (search if key in ("nprobe", "ef", "search_list", "rbq_query_bits", "refine_k") else build)[key] = number
        return cls(name.strip().upper() or "FLAT", build, search)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "build": dict(self.build), "search": dict(self.search)}


def ids_expr(field: str, ids: Sequence[int]) -> str:
    """A Milvus filter: ``field`` is one of these integer ids."""
    return f"{field} in [{','.join(str(int(i)) for i in ids)}]"


def all_ids(client: Any, collection: str) -> list[int]:
    """Every primary key ``id`` of a collection, sorted (read in batches: a query's limit is 16,384)."""
    it = client.query_iterator(
        collection,
        batch_size=CHUNK * 10,
        filter="id >= -9223372036854775808",
        output_fields=["id"],
        consistency_level=STRONG,
    )
    out: list[int] = []
    try:
        while batch := it.next():
            out.extend(int(r["id"]) for r in batch)
    finally:
        it.close()
    return sorted(out)


def create_collection(
    client: Any, name: str, fields: Sequence[tuple[str, Any, dict[str, Any]]], dim: int, index: MilvusIndex
) -> None:
    """A collection of the given scalar fields ``(name, DataType, options)`` plus ``vec``, ``dim`` floats indexed
    for inner product by ``index``, read Strong by default."""
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    for field_name, dtype, options in fields:
        schema.add_field(field_name, dtype, **options)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=int(dim))
    params = client.prepare_index_params()
    params.add_index("vec", index_type=index.type, metric_type="IP", params=dict(index.build))
    client.create_collection(name, schema=schema, index_params=params, consistency_level=STRONG)


def load_rows(
    store: MilvusStore,
    vectors: np.ndarray,
    bulk: int = 20_000,
    progress: Callable[[int], object] | None = None,
    first_id: int = 0,
) -> None:
    """Bulk-load ``vectors`` under ids first_id.., ``bulk`` rows per add (each flushed into a sealed segment)."""
    ids = np.arange(first_id, first_id + len(vectors), dtype=np.int64)
    for start in range(0, len(vectors), bulk):
        store.add(ids[start : start + bulk], vectors[start : start + bulk])
        if progress is not None:
            progress(min(len(vectors), start + bulk) - start)


class MilvusStore:
    """Anchor vectors of one role in one Milvus collection; see the module doc."""

    def __init__(self, client: Any, collection: str, dim: int, index: MilvusIndex | None = None) -> None:
        self.client = client
        self.collection = collection
        self.dim = int(dim)
        self.index = index or MilvusIndex()
        if client.has_collection(collection):
            fields = client.describe_collection(collection)["fields"]
            vec = next((f for f in fields if f["name"] == "vec"), None)
            got = int(vec["params"]["dim"]) if vec else -1
            if got != self.dim:
                raise StoreError(f"Milvus collection {collection!r} holds {got}-d vectors, expected {self.dim}")
        else:
            from pymilvus import DataType

            create_collection(client, collection, [("id", DataType.INT64, {"is_primary": True})], self.dim, self.index)
        client.load_collection(collection)

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"], consistency_level=STRONG)
        return int(rows[0]["count(*)"])

    @property
    def is_exact(self) -> bool:
        return self.index.type in EXACT_TYPES

    @property
    def exact_vectors(self) -> bool:
        return True  # the collection holds the float vectors whatever the index type

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "milvus",
            "collection": self.collection,
            "factory": f"milvus:{self.index.type}",
            **self.index.to_dict(),
        }

    def ids(self) -> np.ndarray:
        return np.array(all_ids(self.client, self.collection), dtype=np.int64)

    def _present(self, ids: list[int], fields: list[str]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            rows.extend(
                self.client.query(
                    self.collection, filter=ids_expr("id", chunk), output_fields=fields, consistency_level=STRONG
                )
            )
        return rows

    def contains(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        held = {int(r["id"]) for r in self._present(ids.tolist(), ["id"])}
        return np.fromiter((i in held for i in ids.tolist()), dtype=bool, count=len(ids))

    # -- edits ----------------------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, x = checked_new(self, ids, vectors)  # Milvus does not enforce unique primary keys: checked here
        for start in range(0, len(ids), CHUNK):
            rows = [
                {"id": int(i), "vec": v.tolist()}
                for i, v in zip(ids[start : start + CHUNK], x[start : start + CHUNK], strict=True)
            ]
            self.client.insert(self.collection, rows)
        if len(ids) >= FLUSH_AT:
            self.client.flush(self.collection)

    def remove(self, ids: np.ndarray) -> int:
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        present = ids[self.contains(ids)].tolist()
        for start in range(0, len(present), CHUNK):
            self.client.delete(self.collection, ids=present[start : start + CHUNK])
        return len(present)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        found, vectors = self.vectors_of(ids)
        if len(found) < len(np.unique(ids)):
            missing = np.setdiff1d(ids, found)
            raise StoreError(f"unknown ids: {missing[:10].tolist()}")
        return vectors[np.searchsorted(found, ids)]

    def vectors_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids held, sorted; their vectors) among ``ids``: in one read, so ids deleted meanwhile (by another
        replica) are simply not there, never an error."""
        rows = self._present(np.unique(np.asarray(ids, dtype=np.int64)).tolist(), ["id", "vec"])
        rows.sort(key=lambda r: int(r["id"]))
        found = np.array([int(r["id"]) for r in rows], dtype=np.int64)
        return found, np.asarray([r["vec"] for r in rows], dtype=np.float32).reshape(len(rows), self.dim)

    # -- search ---------------------------------------------------------------------------------------------
    def _search_params(self, fetch: int) -> dict[str, Any]:
        params = dict(self.index.search)
        if self.index.type.startswith("HNSW"):
            params["ef"] = max(int(params.get("ef", 0)), fetch)  # HNSW needs ef >= limit
        return {"metric_type": "IP", "params": params}

    def _fetch(self, x: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids) of ``fetch`` hits per query, padded with ``-inf``/``-1``; true inner products."""
        rerank = self.index.type not in DISTANCE_EXACT_TYPES
        hits = self.client.search(
            self.collection,
            data=x.tolist(),
            limit=fetch,
            output_fields=["id"],
            search_params=self._search_params(fetch),
            consistency_level=STRONG,
        )
        sims = np.full((len(x), fetch), -np.inf, dtype=np.float32)
        ids = np.full((len(x), fetch), -1, dtype=np.int64)
        for r, row in enumerate(hits):
            got = [(int(h["id"]), float(h["distance"])) for h in row]
            if got:
                ids[r, : len(got)] = [i for i, _ in got]
                sims[r, : len(got)] = [s for _, s in got]
        if rerank:  # quantised distances: recompute from the stored float vectors
            for r in range(len(x)):
                valid = ids[r] >= 0
                if valid.any():
                    found, vectors = self.vectors_of(ids[r, valid])
                    pos = np.minimum(np.searchsorted(found, ids[r, valid]), max(len(found) - 1, 0))
                    held = (found[pos] == ids[r, valid]) if len(found) else np.zeros(valid.sum(), dtype=bool)
                    exact = np.full(held.shape, -np.inf, dtype=np.float32)
                    exact[held] = vectors[pos[held]] @ x[r]
                    sims[r, valid] = exact  # a hit deleted since the search (another replica) drops out
                    ids[r, np.flatnonzero(valid)[~held]] = -1
        return sims, ids

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-min(k, ntotal) neighbours by inner product, sorted descending, ties to the smallest ids."""
        x = as_matrix(queries, self.dim)
        if k > TOPK_MAX:
            raise StoreError(f"k={k} is above Milvus's top-k limit of {TOPK_MAX}")
        n = self.ntotal
        k = effective_k(k, n)
        if k == 0 or len(x) == 0:
            return np.zeros((len(x), k), dtype=np.float32), np.zeros((len(x), k), dtype=np.int64)
        sims = np.empty((len(x), k), dtype=np.float32)
        ids = np.empty((len(x), k), dtype=np.int64)
        factor = 1.0 if self.index.type in DISTANCE_EXACT_TYPES else max(1.0, self.index.rerank_factor)
        fetch = min(n, TOPK_MAX, math.ceil(k * factor) + TIE_MARGIN)
        todo = np.arange(len(x))
        while len(todo):
            s, i = self._fetch(x[todo], fetch)
            # A row whose last hit is in the k-th one's cell may have more equal neighbours beyond the fetch.
            cut = (i[:, -1] >= 0) & (np.floor(s[:, -1] / TIE_GRID) == np.floor(s[:, k - 1] / TIE_GRID))
            done = ~cut if fetch < min(n, TOPK_MAX) else np.ones(len(todo), dtype=bool)
            if done.any():
                sims[todo[done]], ids[todo[done]] = top_sorted(s[done], i[done], k)
            todo = todo[~done]
            fetch = min(n, TOPK_MAX, 2 * fetch)
        return sims, ids
