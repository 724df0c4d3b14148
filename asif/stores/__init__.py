"""Anchor stores: one narrow interface (``VectorStore``), two implementations.

- ``FaissStore``: FAISS in process, with the index folder's files (the embedded default).
- ``MilvusStore``: a Milvus collection (a Milvus server, or milvus-lite embedded), for stateless API replicas.

Also here: the index spec chosen for a size (``spec``), the re-ranking vector table (``vectors``) and duplicate
rows (``duplicates``). It may import ``asif.math`` only (import-linter's contracts in pyproject.toml enforce it).
"""

from asif.stores.base import StoreError, StoreUnavailable, VectorStore, as_matrix
from asif.stores.duplicates import count_distinct_rows
from asif.stores.faiss_index import set_faiss_threads
from asif.stores.faiss_search import RERANK_MIN
from asif.stores.faiss_store import FaissStore, build_store, refine_path
from asif.stores.spec import FLAT_MAX_N, RERANK_FACTOR, IndexSpec, choose_index_spec, ivfpq_params

__all__ = [
    "FLAT_MAX_N",
    "RERANK_FACTOR",
    "RERANK_MIN",
    "FaissStore",
    "IndexSpec",
    "StoreError",
    "StoreUnavailable",
    "VectorStore",
    "as_matrix",
    "build_store",
    "choose_index_spec",
    "count_distinct_rows",
    "ivfpq_params",
    "refine_path",
    "set_faiss_threads",
]
