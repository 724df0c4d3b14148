"""`--quantize int8`: the image encoder quantised statically on anchor images, kept in the index folder, recorded in
the encoder identity, and served from there; misuse is a clear error.

Real effnet-lite0 on Flickr8k photos (../shared/data); the tests skip without the data unless .ci/run requires it.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from asif.encoders import load_image_encoder
from asif.encoders.images import open_image
from asif.encoders.quantize import (
    QUANTIZED_FILE,
    QuantizeError,
    calibration_images,
    check_choice,
    file_sha256,
    quantization_of,
    quantize_image_encoder,
)
from asif.serving.loading import open_index
from asif.state.persist import read_manifest
from index_builder.build import BuildConfig, run_build
from index_builder.errors import BuildError
from tests.conftest import HashTextEncoder
from tests.test_shards import FLICKR, ROOT, flickr_head, needs_flickr


def _photos(start: int, n: int) -> list[Path]:
    return sorted((FLICKR / "images").glob("*.jpg"))[start : start + n]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ASIF_CACHE_DIR", str(tmp_path / "cache"))  # the float export, per test
    return tmp_path / "cache"


def test_choice_is_none_or_int8() -> None:
    assert check_choice(None) == "none" and check_choice(" INT8 ") == "int8"
    with pytest.raises(QuantizeError, match="unknown quantisation 'int4'"):
        check_choice("int4")


def test_calibration_takes_the_first_readable_images(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    photos = _photos(0, 3) if FLICKR.is_dir() else []
    if not photos:
        pytest.skip("no Flickr8k photos")
    images = calibration_images([broken, photos[0], tmp_path / "missing.jpg", photos[1], photos[2]], n=2)
    assert [im.size for im in images] == [open_image(p).size for p in photos[:2]]


@needs_flickr
@pytest.mark.slow
def test_int8_encoder_is_recorded_deterministic_and_close_to_float(tmp_path: Path, cache: Path) -> None:
    encoder = load_image_encoder("effnet-lite0", "cpu", 16, "onnx")
    float_identity = encoder.identity.to_dict()
    calibration = calibration_images(_photos(0, 48))
    held_out = [open_image(p) for p in _photos(100, 24)]
    floats = encoder.encode(held_out)

    quantize_image_encoder(encoder, calibration, tmp_path / "a.onnx")
    entry = quantization_of(encoder.identity.to_dict())
    assert entry == {
        "mode": "int8",
        "scheme": "qdq-u8s8-per-channel-minmax",
        "sha256": file_sha256(tmp_path / "a.onnx"),
        "calibration_images": 48,
    }
    assert {**encoder.identity.preprocessing, "quantization": None} == {
        **float_identity["preprocessing"],
        "quantization": None,
    }
    int8 = encoder.encode(held_out)
    cos = _cos(int8, floats)
    assert cos.mean() >= 0.98 and cos.min() >= 0.9, (cos.mean(), cos.min())  # close, but not the float model
    assert cos.min() < 0.9999

    again = load_image_encoder("effnet-lite0", "cpu", 16, "onnx")
    quantize_image_encoder(again, calibration, tmp_path / "b.onnx")  # the same images: the same bytes (resumable)
    assert file_sha256(tmp_path / "b.onnx") == entry["sha256"]
    with pytest.raises(QuantizeError, match="quantised already"):
        quantize_image_encoder(again, calibration, tmp_path / "c.onnx")

    torch_encoder = load_image_encoder("effnet-lite0", "cpu", 16, "torch")
    with pytest.raises(QuantizeError, match="ONNX Runtime only"):
        quantize_image_encoder(torch_encoder, calibration, tmp_path / "d.onnx")


@pytest.fixture(scope="module")
def flickr30(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 150 rows of Flickr8k's captions.csv: 30 images, 5 captions each."""
    return flickr_head(150, tmp_path_factory.mktemp("flickr30"))


@needs_flickr
@pytest.mark.slow
def test_an_int8_build_is_served_with_its_own_int8_graph(tmp_path: Path, cache: Path, flickr30: Path) -> None:
    out = tmp_path / "index"
    config = BuildConfig(
        pairs=flickr30, images_root=FLICKR / "images", out=out, image_encoder="effnet-lite0", anchors="image",
        runtime="onnx", quantize="int8", decode_workers=1,
    )  # fmt: skip
    log = io.StringIO()
    report = run_build(config, None, HashTextEncoder(), log=log)
    assert report.images == 30 and "quantised to int8 on 30 images" in log.getvalue()
    entry = quantization_of(read_manifest(out)["image_encoder"])
    assert entry is not None and entry["calibration_images"] == 30
    assert entry["sha256"] == file_sha256(out / QUANTIZED_FILE)

    # Served: open_index loads the float encoder by spec and switches it to the index's int8 graph, so a live
    # edit or a query embeds exactly as the build did.
    index = open_index(out, text_encoder=HashTextEncoder(), runtime="onnx")
    encoder = index.model.image_encoder
    assert encoder is not None and quantization_of(encoder.identity.to_dict()) == entry
    ids = np.arange(index.model.n_pairs)
    stored = index.model.image_store.reconstruct(ids)
    photos = [open_image(FLICKR / "images" / index.metadata.get(int(i)).image) for i in ids]
    np.testing.assert_allclose(encoder.encode(photos), stored, atol=1e-5)
    float_encoder = load_image_encoder("effnet-lite0", "cpu", 16, "onnx")
    assert _cos(float_encoder.encode(photos), stored).min() < 0.9999  # the float graph would not match

    with pytest.raises(QuantizeError, match="ONNX Runtime only"):
        open_index(out, text_encoder=HashTextEncoder(), runtime="torch")
    (out / QUANTIZED_FILE).write_bytes((out / QUANTIZED_FILE).read_bytes() + b"\0")
    with pytest.raises(QuantizeError, match="does not match the index"):
        open_index(out, text_encoder=HashTextEncoder(), runtime="onnx")
    (out / QUANTIZED_FILE).unlink()
    with pytest.raises(QuantizeError, match="is missing"):
        open_index(out, text_encoder=HashTextEncoder(), runtime="onnx")


def test_quantize_refuses_what_it_cannot_build(tmp_path: Path) -> None:
    base = BuildConfig(pairs=tmp_path / "pairs.csv", images_root=tmp_path, out=tmp_path / "out", quantize="int8")
    with pytest.raises(BuildError, match="not --store milvus"):
        run_build(replace(base, store="milvus", milvus_uri=str(tmp_path / "m.db")))
    with pytest.raises(BuildError, match="not --ray"):
        run_build(replace(base, ray="local"))
    with pytest.raises(BuildError, match="unknown quantisation"):
        run_build(replace(base, quantize="fp8"))
    assert not (tmp_path / "out").exists()  # refused before any work


def test_serve_refuses_torch_on_an_int8_index(tmp_path: Path) -> None:
    """`asif serve --runtime torch` on an int8 index exits 2 with the reason, before loading anything."""
    from tests.conftest import write_synthetic_index

    index = tmp_path / "index"
    write_synthetic_index(index, n=50)
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["image_encoder"]["preprocessing"]["quantization"] = {"mode": "int8", "sha256": "0" * 64}
    (index / "manifest.json").write_text(json.dumps(manifest))
    run = subprocess.run(
        [sys.executable, "-m", "cli", "serve", "--index", str(index), "--runtime", "torch"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "int8" in run.stderr and "--runtime onnx" in run.stderr


def test_eval_quantize_goes_with_pairs_not_an_index(tmp_path: Path) -> None:
    from evaluation.config import EvalConfig
    from evaluation.run import run_eval
    from tests.conftest import write_synthetic_index

    write_synthetic_index(tmp_path / "index", n=50)
    test = tmp_path / "test" / "cat"
    test.mkdir(parents=True)
    with pytest.raises(ValueError, match="--quantize goes with --pairs"):
        run_eval(EvalConfig(test=tmp_path / "test", out=tmp_path / "out", index=tmp_path / "index", quantize="int8"))
