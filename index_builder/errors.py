"""Errors of `asif build` (a module of their own: the folder and Milvus writers both raise them)."""


class BuildError(RuntimeError):
    """The build cannot proceed (bad arguments, nothing to index, an unreachable target)."""


class AutoTooFewImagesError(BuildError):
    """``--auto`` cannot hold whole images out: the anchors have fewer than 3 distinct images."""


class AlreadyBuiltError(BuildError):
    """The target already holds a model (an index folder's manifest, or a Milvus prefix's) and --force was not given."""
