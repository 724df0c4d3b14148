"""The `asif` command line, an edge like ``app/``, ``index_builder/`` and ``evaluation/``: `asif build` (the index
builder), `asif serve` (the FastAPI app) and `asif eval` (the evaluation), in ``cli.main``.

It may import the core (``asif``) and the other edges; nothing in ``asif`` imports it (import-linter's contracts in
pyproject.toml enforce it).
"""
