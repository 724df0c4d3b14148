"""Choosing settings from data: retrieval metrics and the dense sweep (``metrics``), automatic choice of k and the
weighting on held-out pairs (``autoselect``), the selection criteria compared against each other (``criteria``),
and synthetic worlds with a known answer for the tests and benches (``synthetic``).

Used by the index builder and the evaluation edge, never by serving. It may import ``asif.math`` only
(import-linter's contracts in pyproject.toml enforce it).
"""
