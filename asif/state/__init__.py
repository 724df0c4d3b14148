"""What an index keeps between runs: the index folder and its manifest, deltas and compaction (``persist``), pair
metadata in SQLite (``metadata``), the shared bookkeeping of a Milvus deployment (``milvus_meta``), and the failure
points the fault-injection tests switch on in it (``faults``).

It may import ``asif.stores``, ``asif.encoders`` and ``asif.math``, never ``asif.serving`` or ``asif.tuning``
(import-linter's contracts in pyproject.toml enforce it).
"""
