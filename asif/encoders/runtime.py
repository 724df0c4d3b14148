"""Where an encoder's network runs: ONNX Runtime (exported once, cached) or torch.

Every packaged or ``hf:`` / ``st:`` encoder wraps its network as one torch module whose inputs and output are plain
arrays (pooling included). :func:`load_forward` turns that module into a :class:`Forward`:

- ``onnx``: the module is exported with ``torch.onnx.export`` (opset 17) the first time, into
  ``$ASIF_CACHE_DIR/onnx/<name>-<key>.onnx`` (written to a temporary file, then renamed: never half-written). The key
  hashes the encoder identity, the weights themselves and the onnxruntime version, so changed weights or a new
  runtime export again. A module that cannot be exported or loaded falls back to torch with one warning.
- ``torch``: the module itself, under ``torch.inference_mode``.

``auto`` (the default, or ``$ASIF_RUNTIME``) is ONNX Runtime on CPU, where it measured 2.4-5x faster than torch with
the same weights (docs/performance.md). On CUDA ``auto`` is torch: ONNX Runtime's CUDA provider is unmeasured.

The runtime is not part of the encoder identity: both give the same embeddings (cosine >= 0.9999, tested), so an
index built with one serves with the other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asif.encoders.base import cache_root

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnx", "torch")
RUNTIME_HELP = "auto (ONNX Runtime on CPU, torch on CUDA) | onnx | torch; default $ASIF_RUNTIME or auto"
EXPORT_FORMAT = 1  # bump when the export procedure changes: old cache files are then ignored
OPSET = 17


def default_threads() -> int:
    """Intra-op threads for one encoder: every core (the service runs one encoder call at a time per encoder)."""
    return max(1, os.cpu_count() or 1)


def requested_runtime(runtime: str | None) -> str:
    """The runtime asked for: ``runtime``, else ``$ASIF_RUNTIME``, else ``auto``; an unknown name is a ValueError."""
    name = (runtime or os.environ.get("ASIF_RUNTIME") or "auto").strip().lower()
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    return name


def resolve_runtime(runtime: str | None, device_type: str) -> str:
    """``onnx`` or ``torch`` for an encoder on ``device_type`` ("cpu" or "cuda")."""
    name = requested_runtime(runtime)
    if name == "auto":
        return "onnx" if device_type == "cpu" else "torch"
    return name


@dataclass(frozen=True)
class RuntimeOptions:
    """How an encoder's network runs: the runtime asked for, its threads, and ONNX Runtime's spinning."""

    runtime: str | None = None  # None: $ASIF_RUNTIME or auto
    threads: int | None = None  # None: every core
    # ONNX Runtime's worker threads spin for a while after each call, waiting for the next. That lowers a lone
    # call's latency (4.2 against 5.5 ms here) but burns cores that decoding and search need under load.
    spinning: bool = False


class Forward(ABC):
    """An encoder's network: named float/int arrays in, one (batch, dim) float32 array out."""

    runtime: str  # "onnx" or "torch"

    @abstractmethod
    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...


class TorchForward(Forward):
    runtime = "torch"

    def __init__(self, module: Any, device: Any) -> None:
        self.module, self.device = module, device

    def serve(self, threads: int | None) -> TorchForward:
        """This forward as the encoder's runtime: torch's (process-wide) CPU threads set to ``threads``."""
        import torch

        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        return self

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            tensors = [torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for v in inputs.values()]
            return self.module(*tensors).float().cpu().numpy()


class OrtForward(Forward):
    runtime = "onnx"

    def __init__(self, path: Path, device_type: str, options: RuntimeOptions) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads or default_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spinning else "0")
        providers = ["CPUExecutionProvider"]
        if device_type == "cuda":
            _require_cuda_provider()
            providers.insert(0, "CUDAExecutionProvider")
        self.path, self.device_type, self.options = path, device_type, options
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: inputs[name] for name in self.input_names}
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float32)


def _require_cuda_provider() -> None:
    """ONNX Runtime without its CUDA provider would quietly run a CUDA model on the CPU: refuse instead."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")


def onnx_cache_dir() -> Path:
    """``$ASIF_CACHE_DIR/onnx`` (default ``~/.cache/asif/onnx``)."""
    return cache_root("onnx")


def weights_digest(module: Any, ignored: Collection[str] = ()) -> str:
    """A hash of every parameter and buffer of a torch module (names, shapes, dtypes and values) but those named in
    ``ignored`` (state-dict names the module's output does not depend on)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        if name in ignored:
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(identity: dict[str, Any], digest: str, extra: dict[str, Any] | None = None) -> str:
    """Encoder identity + weights digest + onnxruntime version (+ export format and options)."""
    import onnxruntime as ort

    record = {"identity": identity, "weights": digest, "onnxruntime": ort.__version__, "format": EXPORT_FORMAT}
    record.update(extra or {})
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class ExportSpec:
    """What ``torch.onnx.export`` needs to export an encoder's module with a dynamic batch (and sequence)."""

    example: dict[str, np.ndarray]  # input name -> an example array (names in the module's argument order)
    dynamic_axes: dict[str, dict[int, str]]  # input name -> {axis: name}; the output gets a dynamic batch


def export_onnx(module: Any, spec: ExportSpec, path: Path, device: Any = None) -> None:
    """Export ``module`` to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        example = tuple(torch.from_numpy(v).to(device or "cpu") for v in spec.example.values())
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's TracerWarnings about shapes are expected
            torch.onnx.export(
                module,
                example,
                str(tmp),
                dynamo=False,
                opset_version=OPSET,
                input_names=list(spec.example),
                output_names=["features"],
                dynamic_axes={**spec.dynamic_axes, "features": {0: "batch"}},
            )
        tmp.chmod(0o644)  # mkstemp's 0600 would hide the cache from a server running as another user
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_agreement(onnx: Forward, torch_fwd: Forward, spec: ExportSpec, what: str) -> None:
    """The exported graph must give the module's output (else the export is wrong: use torch), on another batch than
    the traced one: the example's rows reversed plus its first row again (a value the tracer froze shows up)."""
    probe = {k: np.concatenate([v[::-1], v[:1]]) for k, v in spec.example.items()}
    got, want = onnx(probe), torch_fwd(probe)
    cos = np.sum(got * want, axis=1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-12)
    if got.shape != want.shape or float(cos.min()) < 0.9999:
        raise RuntimeError(f"the ONNX export of {what} disagrees with torch (min cosine {float(cos.min()):.6f})")


def load_forward(
    module: Any,
    device: Any,
    identity: dict[str, Any],
    export: ExportSpec,
    options: RuntimeOptions = RuntimeOptions(),
    name: str = "encoder",
    ignored: Collection[str] = (),
) -> Forward:
    """The encoder's network under the runtime ``options`` asks for; torch (with one warning) when ONNX fails.
    ``ignored``: state-dict names of ``module`` its output does not depend on, left out of the export's cache key
    (weights a checkpoint lacks, initialised at random on each load, would otherwise make every load export anew)."""
    torch_forward = TorchForward(module, device)
    if resolve_runtime(options.runtime, device.type) == "torch":
        return torch_forward.serve(options.threads)
    try:
        if device.type == "cuda":
            _require_cuda_provider()  # checked before any export: torch on the GPU is the fallback
        key = cache_key(identity, weights_digest(module, ignored), {"device": device.type})
        path = onnx_cache_dir() / f"{name.replace('/', '_')}-{key}.onnx"
        fresh = not path.is_file()
        if fresh:
            log.info("exporting %s to ONNX (once): %s", name, path)
            export_onnx(module, export, path, device)
        forward = OrtForward(path, device.type, options)
        if fresh:
            try:
                _check_agreement(forward, torch_forward, export, name)
            except RuntimeError:
                path.unlink(missing_ok=True)  # never reused unchecked by a later load
                raise
        return forward
    except Exception as exc:  # any export or load failure: the encoder still works, on torch
        message = f"{name}: ONNX Runtime unavailable ({type(exc).__name__}: {exc}); running it with torch"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        log.warning(message)
        return torch_forward.serve(options.threads)


def forward_in_batches(forward: Forward, inputs: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """Run ``forward`` over the inputs' first axis in slices of ``batch_size``."""
    n = len(next(iter(inputs.values())))
    parts = [
        forward({k: v[start : start + batch_size] for k, v in inputs.items()}) for start in range(0, n, batch_size)
    ]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
