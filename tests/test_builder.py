import contextlib
import io
import json

import numpy as np
import pytest

from asif.serving.labels import LabelSet
from asif.serving.loading import open_index
from asif.state.metadata import PairMetadata
from asif.state.persist import EncoderMismatchError, IndexFolderError, load_index_folder, read_manifest
from index_builder.build import BuildConfig, BuildError, run_build
from index_builder.pairs_io import PairsFileError, read_pairs, resolve_image
from tests.conftest import COLOURS, HashTextEncoder, PixelEncoder, write_pair_collection


def config_for(tmp_path, images, pairs, **kw):
    kw.setdefault("anchors", "image")
    return BuildConfig(pairs=pairs, images_root=images, out=tmp_path / "index", shard_rows=8, batch_size=2, **kw)


def add_bad_rows(tmp_path, images, pairs):
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("not an image")
    good = (images / "red_0.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "secret.jpg").write_bytes(good)
    with open(pairs, "a") as fh:
        fh.write("empty.jpg,an empty file\ntext.jpg,a text file\ntruncated.jpg,half a picture\n")
        fh.write("missing.jpg,a missing file\n../secret.jpg,outside the root\n/etc/passwd,absolute\n")
        fh.write("red_1.jpg,   \n")


def test_build_counts_skips_and_writes_a_loadable_folder(tmp_path, pixel_encoder, hash_encoder):
    images, pairs = write_pair_collection(tmp_path)
    add_bad_rows(tmp_path, images, pairs)
    report = run_build(config_for(tmp_path, images, pairs), pixel_encoder, hash_encoder)
    assert report.images == 20 and report.pairs == 20 and report.captions == 40
    assert report.skipped["empty_captions"] == 1
    assert report.skipped["unsafe_paths"] == 2
    assert report.skipped["unreadable_images"] == 4  # empty, text, truncated, missing
    manifest = read_manifest(tmp_path / "index")
    assert manifest["counts"]["pairs"] == 20 and manifest["anchors"] == "image"
    assert manifest["image_encoder"]["name"] == "pixels-4x4" and manifest["text_encoder"]["dim"] == 64
    assert manifest["defaults"] == {"k": 800, "p": 8.0, "weighting": {"kind": "power", "param": 8.0}}
    assert "auto" not in manifest and "auto:" not in "\n".join(report.lines())
    assert not (tmp_path / "index" / ".build").exists()

    loaded = open_index(tmp_path / "index", pixel_encoder, hash_encoder)
    meta = loaded.metadata
    assert meta.count() == 20
    rec = meta.get(0)
    assert rec.image == "red_0.jpg" and rec.captions == ["a red square number 0", "something red, painted"]
    assert meta.thumbnail("red_0.jpg")[:2] == b"\xff\xd8"  # a JPEG
    # Stored vectors are the encoders' outputs: image as is, text the normalised caption mean.
    from asif.encoders.images import open_image

    np.testing.assert_allclose(
        loaded.model.image_store.reconstruct(np.array([0]))[0],
        pixel_encoder.encode([open_image(images / "red_0.jpg")])[0],
        atol=1e-6,
    )
    mean = hash_encoder.encode(rec.captions).mean(axis=0)
    np.testing.assert_allclose(
        loaded.model.text_store.reconstruct(np.array([0]))[0], mean / np.linalg.norm(mean), atol=1e-6
    )
    # The built model classifies colours from the captions alone.
    labels = loaded.model.make_labels(LabelSet(tuple(COLOURS), ("a {} square",)))
    imgs = [open_image(images / f"{c}_2.jpg") for c in COLOURS]
    preds = loaded.model.classify_images(imgs, labels, k=5, explain=2)
    assert [p.label for p in preds] == list(COLOURS)
    assert all(c in p.explanation[0].caption for c, p in zip(COLOURS, preds, strict=True))


def test_build_log_follows_a_redirected_stderr(tmp_path, pixel_encoder, hash_encoder):
    """Without ``log``, the build writes to ``sys.stderr`` as it is during the call (redirect_stderr, capsys)."""
    images, pairs = write_pair_collection(tmp_path / "data")
    caught = io.StringIO()
    with contextlib.redirect_stderr(caught):
        run_build(
            BuildConfig(pairs=pairs, images_root=images, out=tmp_path / "index", k=10), pixel_encoder, hash_encoder
        )
    assert "building image index" in caught.getvalue()


def test_caption_anchor_mode(tmp_path, pixel_encoder, hash_encoder):
    images, pairs = write_pair_collection(tmp_path)
    report = run_build(config_for(tmp_path, images, pairs, anchors="caption"), pixel_encoder, hash_encoder)
    assert report.pairs == 40
    loaded = open_index(tmp_path / "index", pixel_encoder, hash_encoder)
    a, b = loaded.metadata.get(0), loaded.metadata.get(1)
    assert a.image == b.image == "red_0.jpg" and len(a.captions) == len(b.captions) == 1
    vecs = loaded.model.image_store.reconstruct(np.array([0, 1]))
    np.testing.assert_allclose(vecs[0], vecs[1])


def test_interrupted_build_resumes_without_reembedding(tmp_path, hash_encoder):
    images, pairs = write_pair_collection(tmp_path)
    enc = PixelEncoder()
    enc.fail_after = 5  # shards of 8 rows (4 images), batches of 2: shards 0 and 1 complete, shard 2 dies
    with pytest.raises(KeyboardInterrupt):
        run_build(config_for(tmp_path, images, pairs), enc, hash_encoder)
    work = tmp_path / "index" / ".build"
    assert len(list((work / "shards").glob("*.npz"))) == 2
    assert not (tmp_path / "index" / "manifest.json").exists()
    enc2 = PixelEncoder()
    report = run_build(config_for(tmp_path, images, pairs), enc2, hash_encoder)
    assert report.shards_resumed == 2 and report.images_embedded_now == 12 and enc2.calls == 6
    fresh = run_build(
        BuildConfig(
            pairs=pairs, images_root=images, out=tmp_path / "fresh", shard_rows=8, batch_size=2, anchors="image"
        ),
        PixelEncoder(),
        hash_encoder,
    )
    assert fresh.pairs == report.pairs
    a = load_index_folder(tmp_path / "index").image_store
    b = load_index_folder(tmp_path / "fresh").image_store
    ids = np.arange(report.pairs)
    np.testing.assert_allclose(a.reconstruct(ids), b.reconstruct(ids), atol=1e-6)


def test_changed_inputs_discard_stale_chunks(tmp_path, hash_encoder):
    images, pairs = write_pair_collection(tmp_path)
    enc = PixelEncoder()
    enc.fail_after = 2
    with pytest.raises(KeyboardInterrupt):
        run_build(config_for(tmp_path, images, pairs), enc, hash_encoder)
    pairs.write_text(pairs.read_text().replace("square", "tile"))
    report = run_build(config_for(tmp_path, images, pairs), PixelEncoder(), hash_encoder)
    assert report.shards_resumed == 0 and report.shards_embedded_now == 5


def test_existing_index_needs_force_and_rebuild_is_clean(tmp_path, pixel_encoder, hash_encoder):
    images, pairs = write_pair_collection(tmp_path)
    run_build(config_for(tmp_path, images, pairs), pixel_encoder, hash_encoder)
    with pytest.raises(BuildError, match="--force"):
        run_build(config_for(tmp_path, images, pairs), pixel_encoder, hash_encoder)
    run_build(config_for(tmp_path, images, pairs, force=True, anchors="caption"), pixel_encoder, hash_encoder)
    out = tmp_path / "index"
    manifest = read_manifest(out)
    assert manifest["generation"] == 2 and manifest["counts"]["pairs"] == 40
    names = sorted(p.name for p in out.iterdir() if not p.name.endswith(("-wal", "-shm")))
    current = [name for role in ("image", "text") for name in manifest["indices"][role]["sha256"]]
    assert {"image-g000002.faiss", "text-g000002.faiss"} <= set(current)
    assert all("-g000002." in name for name in current)  # nothing of generation 1 is left
    assert names == sorted(["manifest.json", *current, manifest["metadata"]])
    assert PairMetadata(out / manifest["metadata"]).count() == 40


def test_load_rejects_other_encoders_and_corrupt_files(tmp_path, pixel_encoder, hash_encoder):
    images, pairs = write_pair_collection(tmp_path)
    run_build(config_for(tmp_path, images, pairs), pixel_encoder, hash_encoder)
    out = tmp_path / "index"
    other = HashTextEncoder()
    other.identity = type(other.identity)("test:other", "other-bow", "text", 64, {})
    with pytest.raises(EncoderMismatchError, match="text encoder 'hash-bow'"):
        open_index(out, pixel_encoder, other)
    manifest = read_manifest(out)
    index_file = out / manifest["indices"]["image"]["file"]
    data = bytearray(index_file.read_bytes())
    data[-10] ^= 0xFF
    index_file.write_bytes(bytes(data))
    with pytest.raises(IndexFolderError, match="corrupt"):
        load_index_folder(out)
    index_file.write_bytes(bytes(data[:100]))
    with pytest.raises(IndexFolderError):
        load_index_folder(out, verify=False)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFolderError, match="not valid JSON"):
        read_manifest(out)


def test_pairs_file_formats(tmp_path):
    (tmp_path / "p.tsv").write_text("Image\tCaption\na.jpg\tA cat .\nb.jpg\t\n")
    got = read_pairs(tmp_path / "p.tsv")
    assert got.rows == [("a.jpg", "A cat .")] and got.empty_captions == 1
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"image": "a.jpg", "caption": "x  y"}) + "\n{bad json\n\n" + json.dumps([1]) + "\n"
    )
    got = read_pairs(tmp_path / "p.jsonl")
    assert got.rows == [("a.jpg", "x y")] and got.bad_lines == [2, 4]
    (tmp_path / "p.csv").write_text("path,text\na.jpg,cat\n")
    with pytest.raises(PairsFileError, match="columns"):
        read_pairs(tmp_path / "p.csv")
    with pytest.raises(PairsFileError, match="unsupported"):
        read_pairs(tmp_path / "p.parquet") if (tmp_path / "p.parquet").write_text("x") else None
    root = tmp_path / "root"
    root.mkdir()
    assert resolve_image(root, "a/b.jpg") == (root / "a/b.jpg").resolve()
    for bad in ["../x.jpg", "/etc/passwd", "a/../../x.jpg", "", "a\x00.jpg", "."]:
        assert resolve_image(root, bad) is None


@pytest.mark.slow
def test_cli_build_with_packaged_encoders(tmp_path, capsys):
    from cli.main import main

    images, pairs = write_pair_collection(tmp_path, n_per_colour=2)
    out = tmp_path / "index"
    args = ["build", "--pairs", str(pairs), "--images-root", str(images), "--out", str(out)]
    assert main([*args, "--image-encoder", "effnet-lite0", "--text-encoder", "minilm"]) == 0  # default: per caption
    printed = capsys.readouterr().out
    assert "anchors (pairs):   16" in printed and "img/s" in printed
    manifest = read_manifest(out)
    assert manifest["image_encoder"]["name"] == "efficientnet-lite0" and manifest["image_encoder"]["dim"] == 1280
    assert manifest["anchors"] == "caption"
    assert manifest["text_encoder"]["dim"] == 384
    loaded = open_index(out)
    assert loaded.model.n_pairs == 16
    # Same command again without --force: refused with a clear message, exit status 2.
    assert main([*args, "--image-encoder", "effnet-lite0", "--text-encoder", "minilm"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (
        main(
            [
                "build",
                "--pairs",
                str(tmp_path / "nope.csv"),
                "--images-root",
                str(images),
                "--out",
                str(tmp_path / "x"),
                "--image-encoder",
                "effnet-lite0",
            ]
        )
        == 2
    )
