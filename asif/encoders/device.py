"""Pick the torch device an encoder runs on."""

from __future__ import annotations

import torch


def resolve_device(device: str | None = None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return resolved
