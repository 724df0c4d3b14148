"""`asif build` on the encoders' runtime: decode workers that prepare the images (the build process runs only the
network), a progress bar that moves per image batch, and torch and ONNX Runtime builds that agree.

The Flickr8k tests need ../shared/data (ASIF_SHARED_DATA) and build with the packaged encoders (effnet-lite0,
MiniLM) on 40 images (200 captions).
"""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import replace
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

import index_builder.build as build_module
import index_builder.embed_step as embed_step
import index_builder.shard_embed as shard_embed
from asif.encoders.images import open_image, thumbnail_jpeg
from asif.encoders.prepare import ResizePrepare
from asif.serving.loading import open_index
from asif.state.persist import load_index_folder, read_manifest
from index_builder.build import BuildConfig, run_build
from index_builder.decode import Decoder
from tests.conftest import HashTextEncoder, PixelEncoder, write_pair_collection
from tests.test_shards import FLICKR, ROOT, flickr_head, needs_flickr, stores_equal

# ---------------------------------------------------------------------------------------------
# Decode workers prepare the images


def test_decode_workers_return_prepared_arrays_and_thumbnails(tmp_path):
    images, _ = write_pair_collection(tmp_path)
    (images / "broken.jpg").write_bytes(b"not an image")
    files = sorted(images.glob("*.jpg"))
    prepare = ResizePrepare(24)
    with Decoder(1, 10_000, prepare) as in_workers:
        got = in_workers.submit(files)()
    assert in_workers.busy_seconds > 0
    broken = files.index(images / "broken.jpg")
    assert got[broken] == (None, b"")  # unreadable: as without a preparer
    for i, (prepared, thumb) in enumerate(got):
        if i == broken:
            continue
        image = open_image(files[i])
        assert isinstance(prepared, np.ndarray) and prepared.dtype == np.uint8 and prepared.shape == (24, 24, 3)
        np.testing.assert_array_equal(prepared, prepare(image))
        assert thumb == thumbnail_jpeg(image)
    with Decoder(0, 10_000, prepare) as in_process:  # no workers: prepared here, the same arrays
        same = in_process.submit(files)()
    assert all(a is None if b is None else np.array_equal(a, b) for (a, _), (b, _) in zip(same, got, strict=True))
    with Decoder(1, 10_000) as plain:  # no preparer: the decoded images, as before
        decoded = plain.submit(files[:3])()
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im, _ in decoded)


def test_a_decode_worker_imports_no_torch():
    """What a worker runs (decoding, a preparer) must not import torch: spawned workers start in well under a second."""
    code = (
        "import sys; from index_builder.decode import decode_many; from asif.encoders.prepare import ResizePrepare; "
        "import asif.encoders; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


class PreparingPixelEncoder(PixelEncoder):
    """PixelEncoder in two steps: a 4x4 bicubic resize in the decode workers, the projection here. Counts which of
    ``encode`` and ``encode_prepared`` the build called."""

    def __init__(self) -> None:
        super().__init__()
        self.prepared_calls = 0

    def preparer(self) -> ResizePrepare:
        return ResizePrepare(4)

    def prepare(self, image):
        return self.preparer()(image)

    def encode_prepared(self, prepared):
        self.prepared_calls += 1
        assert all(isinstance(p, np.ndarray) and p.shape == (4, 4, 3) for p in prepared)
        return PixelEncoder.encode(self, [Image.fromarray(p) for p in prepared])

    def encode(self, images):
        raise AssertionError("the build must send prepared images to encode_prepared")


@pytest.mark.parametrize("workers", [0, 1])
def test_build_encodes_what_the_workers_prepared(tmp_path, workers):
    images, pairs = write_pair_collection(tmp_path)
    enc = PreparingPixelEncoder()
    config = BuildConfig(pairs=pairs, images_root=images, out=tmp_path / "prepared", shard_rows=8, batch_size=2)
    report = run_build(replace(config, decode_workers=workers), enc, HashTextEncoder())
    assert report.images == 20 and enc.prepared_calls == 10  # 5 shards of 4 images, batches of 2
    plain = replace(config, out=tmp_path / "plain", decode_workers=workers)
    run_build(plain, PixelEncoder(), HashTextEncoder())  # preparer() None: encode() on decoded images
    stores_equal(tmp_path / "prepared", tmp_path / "plain", report.pairs)


def test_the_next_batch_decodes_while_captions_encode_not_images(tmp_path, monkeypatch):
    """On a small machine decoding beside the image encoder takes its cores: the next read batch is sent to the
    decoders after this batch's images are encoded, and decodes while its captions are."""
    events: list[str] = []

    class LoggingDecoder(embed_step.Decoder):
        def submit(self, sources):
            events.append("decode")
            return super().submit(sources)

    class LoggingImages(PreparingPixelEncoder):
        def encode_prepared(self, prepared):
            events.append("images")
            return super().encode_prepared(prepared)

    class LoggingCaptions(HashTextEncoder):
        def encode(self, texts):
            events.append("captions")
            return super().encode(texts)

    monkeypatch.setattr(embed_step, "Decoder", LoggingDecoder)
    monkeypatch.setattr(shard_embed, "READ_BATCH", 4)  # 2 new images per read batch
    images, pairs = write_pair_collection(tmp_path)
    config = BuildConfig(pairs=pairs, images_root=images, out=tmp_path / "out", shard_rows=12, batch_size=8)
    run_build(replace(config, decode_workers=0), LoggingImages(), LoggingCaptions())

    def shard(batches: int) -> list[str]:
        order = ["decode"]
        for i in range(batches):
            order += ["images", *(["decode"] if i < batches - 1 else []), "captions"]
        return order

    assert events == shard(3) + shard(3) + shard(3) + shard(1)  # 40 rows: shards of 12, 12, 12 and 4


# ---------------------------------------------------------------------------------------------
# Progress per image batch


class RecordingBar(embed_step.tqdm):
    """tqdm that keeps every update (its size and the postfix then); the bars made, in order, in ``bars``."""

    bars: ClassVar[list[RecordingBar]] = []

    def __init__(self, *args, **kwargs) -> None:
        self.updates: list[tuple[int, str]] = []
        super().__init__(*args, **kwargs)
        RecordingBar.bars.append(self)

    def update(self, n=1):
        self.updates.append((n, self.postfix or ""))
        return super().update(n)


def test_progress_counts_images_per_batch_and_resumed_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(embed_step, "tqdm", RecordingBar)
    RecordingBar.bars = []
    images, pairs = write_pair_collection(tmp_path)  # 20 images, 2 captions each
    config = BuildConfig(
        pairs=pairs, images_root=images, out=tmp_path / "index", shard_rows=8, batch_size=3, decode_workers=0
    )  # 5 shards of 4 images, encoder batches of 3 + 1

    def stop_after_two(name: str, done: list = []) -> None:  # noqa: B006 (a counter across calls)
        done.append(name)
        if len(done) == 2:
            raise KeyboardInterrupt("stopped")

    with pytest.raises(KeyboardInterrupt):
        run_build(config, PixelEncoder(), HashTextEncoder(), log=io.StringIO(), after_shard=stop_after_two)
    first = RecordingBar.bars[-1]
    moves = [n for n, _ in first.updates if n]
    assert moves == [3, 1, 3, 1]  # per encoder batch, not per shard
    assert [p for n, p in first.updates if n == 3] == ["0/5 shards", "1/5 shards"]

    log = io.StringIO()
    report = run_build(config, PixelEncoder(), HashTextEncoder(), log=log)
    assert report.shards_resumed == 2 and report.images_resumed == 8 and report.images_embedded_now == 12
    bar = RecordingBar.bars[-1]
    assert bar.n == 20 and sum(n for n, _ in bar.updates) == 12  # starts at the resumed shards' 8 images
    assert [n for n, _ in bar.updates if n] == [3, 1] * 3
    assert bar.updates[0][1] == "2/5 shards"
    shown = log.getvalue()  # what the user sees: images, img/s and the shards done
    assert "8img" in shown and "2/5 shards" in shown
    final = shown.split("\r")[-1]
    assert "20img" in final and "img/s" in final and "5/5 shards" in final


# ---------------------------------------------------------------------------------------------
# Real encoders on Flickr8k photos


@pytest.fixture(scope="module")
def flickr40(tmp_path_factory):
    """The first 200 rows of Flickr8k's captions.csv: 40 images, 5 captions each."""
    return flickr_head(200, tmp_path_factory.mktemp("flickr40"))


@needs_flickr
@pytest.mark.slow
def test_build_from_worker_prepared_images_equals_encode(tmp_path, flickr40):
    from asif.encoders import load_image_encoder

    image_encoder = load_image_encoder("effnet-lite0", "cpu", 16, "onnx")
    assert image_encoder.runtime == "onnx" and image_encoder.preparer() is not None
    config = BuildConfig(
        pairs=flickr40, images_root=FLICKR / "images", out=tmp_path / "index", anchors="image", decode_workers=2
    )
    report = run_build(config, image_encoder, HashTextEncoder())
    assert report.images == 40 and report.decode_workers == 2
    index = open_index(tmp_path / "index", image_encoder, HashTextEncoder())
    ids = np.arange(index.model.n_pairs)
    built = index.model.image_store.reconstruct(ids)
    photos = [open_image(FLICKR / "images" / index.metadata.get(int(i)).image) for i in ids]
    np.testing.assert_allclose(built, image_encoder.encode(photos), atol=1e-5)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@needs_flickr
@pytest.mark.slow
def test_torch_and_onnx_builds_agree(tmp_path, flickr40, monkeypatch, capsys):
    from cli.main import main

    loaded = []

    def spy(load):
        def wrapped(*args, **kwargs):
            encoder = load(*args, **kwargs)
            loaded.append(encoder.runtime)
            return encoder

        return wrapped

    monkeypatch.setattr(build_module, "load_image_encoder", spy(build_module.load_image_encoder))
    monkeypatch.setattr(build_module, "load_text_encoder", spy(build_module.load_text_encoder))
    for runtime in ("torch", "onnx"):
        args = ["build", "--pairs", str(flickr40), "--images-root", str(FLICKR / "images")]
        args += ["--out", str(tmp_path / runtime), "--image-encoder", "effnet-lite0", "--text-encoder", "minilm"]
        assert main([*args, "--runtime", runtime, "--decode-workers", "1"]) == 0, capsys.readouterr().err
    assert loaded == ["torch", "torch", "onnx", "onnx"]  # each build ran on the runtime it was given
    a, b = read_manifest(tmp_path / "torch"), read_manifest(tmp_path / "onnx")
    assert a["image_encoder"] == b["image_encoder"] and a["text_encoder"] == b["text_encoder"]
    assert a["counts"] == b["counts"] and a["counts"]["pairs"] == 200
    fa, fb = load_index_folder(tmp_path / "torch"), load_index_folder(tmp_path / "onnx")
    ids = np.arange(200)
    for role in ("image_store", "text_store"):
        got = cosines(getattr(fa, role).reconstruct(ids), getattr(fb, role).reconstruct(ids))
        assert got.min() >= 0.9999, (role, float(got.min()))


# ---------------------------------------------------------------------------------------------
# Ray: the runtime reaches the actors, CPU actors run their encoders on one thread


class FakeRay:
    """Just enough of Ray for :func:`embed_with_ray` to start its job: records what ``map_batches`` is given."""

    def __init__(self, resources: dict[str, float]) -> None:
        self.resources, self.kwargs = resources, {}
        self.data = self

    def cluster_resources(self) -> dict[str, float]:
        return self.resources

    def from_items(self, items, override_num_blocks):
        return self

    def map_batches(self, fn, **kwargs):
        self.kwargs = kwargs
        return self

    def iter_batches(self, **kwargs):
        return iter(())


@pytest.mark.parametrize(("resources", "threads"), [({"CPU": 4.0}, 1), ({"CPU": 16.0, "GPU": 2.0}, None)])
def test_ray_actors_get_the_runtime_and_one_thread_per_cpu_actor(tmp_path, monkeypatch, resources, threads):
    import asif.encoders
    from index_builder import ray_embed
    from index_builder.sources import SourceOptions, list_shards

    fake = FakeRay(resources)
    monkeypatch.setattr(ray_embed, "connect", lambda address: fake)
    images, pairs = write_pair_collection(tmp_path)
    _, shards = list_shards(pairs, SourceOptions(images_root=images, shard_rows=8), {})
    args = (SourceOptions(images_root=images), "effnet-lite0", "minilm", [], None, 32, 10_000, lambda *a: None)
    ray_embed.embed_with_ray("local", shards, *args, log=io.StringIO(), runtime="torch")
    given = fake.kwargs["fn_constructor_kwargs"]
    assert given["runtime"] == "torch" and given["threads"] == threads

    loaded = []  # the actor loads its encoders with these runtime options
    monkeypatch.setattr(asif.encoders, "load_image_encoder", lambda *a: loaded.append(a[-1]) or PreparingPixelEncoder())
    monkeypatch.setattr(asif.encoders, "load_text_encoder", lambda *a: loaded.append(a[-1]) or HashTextEncoder())
    actor = ray_embed.ShardEmbedder(**given)
    assert loaded == [asif.encoders.RuntimeOptions(runtime="torch", threads=threads)] * 2
    assert actor.decoder.prepare == ResizePrepare(4)  # the actor's decoding prepares too
