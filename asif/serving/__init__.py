"""The model as served: scoring queries against label sets (``model``, ``labels``), opening an index folder into a
model (``loading``), the live, editable model behind the API for one process (``live``, guarded by ``rwlock``) and
for several processes sharing one Milvus deployment (``shared_live``).

The top layer of the core: it may import everything else in ``asif`` except ``asif.tuning``, and nothing in
``asif`` imports it (import-linter's contracts in pyproject.toml enforce it).
"""
