"""The mathematics of ASIF, pure numpy/scipy: relative representations and their sparsification (``relrep``),
label scoring (``scoring``), the served variants (``variants``), forming anchors from captioned rows
(``anchors``), row-wise L2 normalisation (``normalise``) and content hashes of rows (``rowhash``).

The bottom layer of the core: nothing here does I/O, loads a model or keeps state between calls, and it imports
nothing from the rest of ``asif`` (import-linter's ``layers`` contract in pyproject.toml enforces it).
"""
