"""`asif build --store milvus`: the same anchors, ids and metadata as an index folder, loaded into a shared model;
a built model is never overwritten without --force; the leftovers of an interrupted load are cleared; thumbnails
outlive the pair that carried them."""

from __future__ import annotations

import numpy as np
import pytest

from asif.serving.loading import open_index
from asif.state.milvus_meta import MilvusMetadata, read_manifest
from asif.stores.milvus_store import MilvusStore
from cli.main import main
from index_builder.build import BuildConfig, run_build
from index_builder.errors import AlreadyBuiltError
from tests.conftest import HashTextEncoder, MilvusTarget, PixelEncoder, open_live, write_pair_collection
from tests.test_builder import add_bad_rows

ENCODERS = ["--image-encoder", "py:tests.conftest:PixelEncoder", "--text-encoder", "py:tests.conftest:HashTextEncoder"]


@pytest.fixture
def collection(tmp_path):
    images, pairs = write_pair_collection(tmp_path / "data")
    return images, pairs


def milvus_config(tmp_path, images, pairs, **kw):
    kw.setdefault("anchors", "caption")
    return BuildConfig(
        pairs=pairs, images_root=images, out=tmp_path / "work", store="milvus", milvus_uri=str(tmp_path / "m.db"), **kw
    )


def test_the_shared_model_holds_what_an_index_folder_holds(tmp_path, collection):
    images, pairs = collection
    add_bad_rows(tmp_path / "data", images, pairs)
    report = run_build(milvus_config(tmp_path, images, pairs), PixelEncoder(), HashTextEncoder())
    folder = BuildConfig(pairs=pairs, images_root=images, out=tmp_path / "index", anchors="caption")
    run_build(folder, PixelEncoder(), HashTextEncoder())
    assert report.pairs == 40 and report.skipped["unreadable_images"] == 4
    assert not (tmp_path / "work").exists()  # only the resumable chunks were there

    loaded = open_index(tmp_path / "index", PixelEncoder(), HashTextEncoder())
    model, in_folder = loaded.model, loaded.metadata
    from pymilvus import MilvusClient

    client = MilvusClient(str(tmp_path / "m.db"))
    manifest = read_manifest(client, "asif")
    assert manifest["store"] == "milvus" and manifest["anchors"] == "caption" and manifest["counts"]["pairs"] == 40
    ids = np.arange(40, dtype=np.int64)
    for role, store in (("image", model.image_store), ("text", model.text_store)):
        shared = MilvusStore(client, f"asif_{role}", store.dim)
        assert shared.ids().tolist() == ids.tolist()
        np.testing.assert_array_equal(shared.reconstruct(ids), store.reconstruct(ids))
    live = open_live(MilvusTarget(str(tmp_path / "m.db")))
    meta = live.metadata
    assert [meta.get(i) for i in range(40)] == [in_folder.get(i) for i in range(40)]
    # One thumbnail per image, and it moves to a pair that stays when its pair is deleted.
    first, second = [r.id for r in meta.page(limit=40) if r.image == "red_0.jpg"]
    thumb = meta.thumbnail("red_0.jpg")
    assert thumb[:2] == b"\xff\xd8"
    live.delete_pairs([first])
    assert meta.thumbnail("red_0.jpg") == thumb
    live.delete_pairs([second])
    assert meta.thumbnail("red_0.jpg") is None


def test_a_built_model_needs_force_and_leftovers_are_cleared(tmp_path, collection):
    images, pairs = collection
    run_build(milvus_config(tmp_path, images, pairs, anchors="image"), PixelEncoder(), HashTextEncoder())
    with pytest.raises(AlreadyBuiltError, match="--force"):
        run_build(milvus_config(tmp_path, images, pairs), PixelEncoder(), HashTextEncoder())
    from pymilvus import MilvusClient

    client = MilvusClient(str(tmp_path / "m.db"))
    live = open_live(MilvusTarget(str(tmp_path / "m.db")))
    live.delete_pairs([0, 1])
    assert live.metadata.count() == 18 and live.metadata.last_seq() == 2  # two delete records committed
    run_build(milvus_config(tmp_path, images, pairs, force=True), PixelEncoder(), HashTextEncoder())
    meta = MilvusMetadata(client, "asif", 64)
    assert meta.count() == 40 and meta.writers() == {} and read_manifest(client, "asif")["anchors"] == "caption"
    # An interrupted load leaves collections but no manifest: the next build starts over without --force.
    client.drop_collection("asif_meta")
    MilvusStore(client, "asif_image", 48).add(np.array([999], dtype=np.int64), np.ones((1, 48), np.float32) / 48**0.5)
    run_build(milvus_config(tmp_path, images, pairs), PixelEncoder(), HashTextEncoder())
    assert MilvusStore(client, "asif_image", 48).ids().tolist() == list(range(40))


def test_cli_build_into_milvus_and_its_errors(tmp_path, collection, capsys, monkeypatch):
    monkeypatch.setenv("ASIF_PLUGIN_ENCODERS", "1")  # the fast test encoders are plugin classes
    images, pairs = collection
    db = str(tmp_path / "cli.db")
    args = ["build", "--store", "milvus", "--milvus-uri", db, "--pairs", str(pairs), "--images-root", str(images)]
    assert main([*args, *ENCODERS, "--milvus-prefix", "colours", "--out", str(tmp_path / "w")]) == 0
    assert "shared model 'colours' loaded into Milvus" in capsys.readouterr().out
    assert main([*args, *ENCODERS, "--milvus-prefix", "colours", "--out", str(tmp_path / "w")]) == 2
    assert "already holds a model; pass --force" in capsys.readouterr().err
    assert main([*args, *ENCODERS, "--milvus-prefix", "colours", "--skip-existing"]) == 0  # a builder run again
    assert "nothing to do (--skip-existing)" in capsys.readouterr().out
    assert main([*args, *ENCODERS, "--milvus-prefix", "bad-prefix!"]) == 2
    assert "bad Milvus prefix" in capsys.readouterr().err
    assert main([*args, *ENCODERS, "--milvus-index", "HNSW:M"]) == 2
    assert "not key=value" in capsys.readouterr().err
    assert main(["build", "--pairs", str(pairs), "--images-root", str(images), *ENCODERS]) == 2
    assert "--out is required" in capsys.readouterr().err
