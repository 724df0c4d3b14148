"""`asif build --auto` and `--weighting`: the label-free choice of k and the weighting, streamed over the shard files,
is auto_kp's over the same anchors in memory; the manifest records the served defaults and the served model uses
them; a parameter of another weighting is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from asif.math.normalise import l2_normalise
from asif.math.relrep import Weighting
from asif.math.topk import exact_topk
from asif.serving.loading import open_index
from asif.state.persist import load_index_folder, read_manifest
from asif.tuning.autoselect import (
    AUTO_KS,
    AUTO_WEIGHTINGS,
    CRITERION,
    TooFewImagesError,
    auto_kp,
    holdouts,
    image_keys,
)
from asif.tuning.synthetic import SyntheticWorld
from cli.main import main
from index_builder.anchor_chunks import anchor_chunks
from index_builder.auto_select import auto_select, held_out_neighbours
from index_builder.build import BuildConfig, run_build
from index_builder.errors import AutoTooFewImagesError
from index_builder.shard_embed import ShardEmbedding
from tests.conftest import COLOURS, HashTextEncoder, MilvusTarget, PixelEncoder, open_live

ENCODERS = ["--image-encoder", "py:tests.conftest:PixelEncoder", "--text-encoder", "py:tests.conftest:HashTextEncoder"]


def write_shards(folder, images_per_shard, seed=0):
    """Shard embedding files of synthetic pairs: two captions per image (so caption anchors repeat each image
    vector), one unreadable image in the first shard (its captions are no anchors)."""
    world = SyntheticWorld(d_image=48, d_text=32, n_classes=12, latent_dim=12, seed=seed)
    rng = np.random.default_rng(seed)
    files = []
    for s, n in enumerate(images_per_shard):
        image, text = world.anchors(n)
        ok = np.ones(n, bool)
        ok[: 1 if s == 0 else 0] = False
        captions = np.stack([text, l2_normalise(text + 0.3 * rng.standard_normal(text.shape).astype(np.float32))], 1)
        emb = ShardEmbedding(
            name=f"shard{s}",
            fingerprint=f"f{s}",
            image_emb=np.where(ok[:, None], image, 0).astype(np.float32),
            image_ok=ok,
            refs=[f"{s}/{i}.jpg" for i in range(n)],
            thumbs=[b""] * n,
            caption_emb=captions.reshape(2 * n, -1),
            sample_image=np.repeat(np.arange(n), 2),
            captions=[f"caption {j} of {s}/{i}" for i in range(n) for j in range(2)],
            sample_refs=[f"{s}/{i}.jpg" for i in range(n) for _ in range(2)],
        )
        path = folder / f"{s}.npz"
        path.write_bytes(emb.to_bytes())
        files.append(path)
    return files


def all_anchors(files, mode):
    chunks = [chunk for _, chunk in anchor_chunks(files, mode)]
    return tuple(np.concatenate([c.vectors[role] for c in chunks]) for role in ("image", "text"))


def assert_same_choice(choice, expected):
    assert (choice.k, choice.weighting) == (expected.k, expected.weighting)
    assert (choice.held_out_images, choice.seeds) == (expected.held_out_images, expected.seeds)
    assert choice.table.keys() == expected.table.keys()
    np.testing.assert_allclose([choice.table[kw] for kw in expected.table], list(expected.table.values()), atol=1e-6)


@pytest.mark.parametrize("mode", ["caption", "image"])
def test_streamed_selection_is_auto_kp_over_the_same_anchors(tmp_path, mode):
    # Shards smaller and larger than the largest k, one of a single image: neighbours are merged across them.
    files = write_shards(tmp_path, [37, 5, 120, 1, 60, 117])
    image, text = all_anchors(files, mode)
    n = len(image)
    assert n == (2 * 339 if mode == "caption" else 339)
    for seed in (0, 3):
        choice = auto_select(files, mode, n, seed=seed)
        assert_same_choice(choice, auto_kp(image, text, AUTO_KS, AUTO_WEIGHTINGS, seed))
        assert choice.held_out_images == (33, 33, 33) and choice.seeds == (seed, seed + 1, seed + 2)
        assert len(set(choice.table.values())) > 5  # the grid really discriminates: the check is not vacuous

    # The neighbours themselves are the exact ones among each split's anchors not held out, under pair ids: the held
    # images' (one row each) and all their captions'.
    splits = holdouts(image_keys(image), seed=0)
    found = held_out_neighbours(files, mode, splits, 800)
    for split, neighbours in zip(splits, found, strict=True):
        if mode == "caption":
            assert len(split.held) == 2 * len(split.queries)  # both captions of every held-out image
        sides = ((split.queries, image, neighbours[0]), (split.held, text, neighbours[1]))
        for queries, anchors, (got_s, got_i) in sides:
            sims, rows = exact_topk(anchors[queries], anchors[split.train], 800)
            assert got_s.shape == (len(queries), len(split.train))  # k capped at the anchors searched
            np.testing.assert_array_equal(got_i, split.train[rows])
            np.testing.assert_allclose(got_s, sims, atol=1e-6)


def write_pairs(root, n_per_colour=12):
    """Coloured JPEGs of several shades per colour, captions naming colour and shade (HashTextEncoder tells them
    apart); returns (images root, pairs CSV)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    images = root / "images"
    images.mkdir(parents=True)
    lines = ["image,caption"]
    for colour, rgb in COLOURS.items():
        for j in range(n_per_colour):
            shade = j % 3
            arr = np.clip(np.array(rgb) * (0.5 + 0.25 * shade) + rng.normal(0, 20, (16, 16, 3)), 0, 255)
            name = f"{colour}_{j}.jpg"
            Image.fromarray(arr.astype(np.uint8)).save(images / name)
            lines += [f"{name},a {colour} square shade{shade}", f"{name},{['dark', 'mid', 'light'][shade]} {colour}"]
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return images, root / "pairs.csv"


def auto_config(tmp_path, images, pairs, **kw):
    kw.setdefault("out", tmp_path / "index")
    return BuildConfig(pairs=pairs, images_root=images, shard_rows=10, decode_workers=0, auto=True, **kw)


def test_auto_build_records_the_choice_and_the_served_model_uses_it(tmp_path):
    images, pairs = write_pairs(tmp_path / "data")
    config = auto_config(tmp_path, images, pairs, k=7, p=3.0, weighting="rank", seed=5)
    report = run_build(config, PixelEncoder(), HashTextEncoder())
    assert report.shards == 10 and report.pairs == 96

    folder = load_index_folder(tmp_path / "index")
    ids = np.arange(report.pairs)
    image, text = folder.image_store.reconstruct(ids), folder.text_store.reconstruct(ids)
    expected = auto_kp(image, text, AUTO_KS, AUTO_WEIGHTINGS, seed=5)
    k, weighting, table = expected.k, expected.weighting, expected.table
    manifest = read_manifest(tmp_path / "index")
    p = weighting.param if weighting.kind == "power" else 3.0
    assert manifest["defaults"] == {"k": k, "p": p, "weighting": weighting.to_dict()}
    auto = manifest["auto"]
    assert auto["criterion"] == CRITERION and "mean reciprocal rank" in CRITERION
    assert auto["held_out_images"] == [4, 4, 4] and auto["seeds"] == [5, 6, 7]  # 10% of 48 images, per split
    assert auto["table"] == pytest.approx({f"{k},{w.describe()}": v for (k, w), v in table.items()}, abs=1e-6)
    assert auto["table"]["25,power p=1"] == pytest.approx(table[(25, Weighting("power", 1.0))], abs=1e-6)
    assert report.auto["k"] == k and report.auto["mrr"] == pytest.approx(table[(k, weighting)])
    mrr = table[(k, weighting)]
    line = f"auto:              k={k}, {weighting.describe()} (held-out mrr {mrr:.3f} over 4 images x 3 splits"
    assert any(ln.startswith(line) for ln in report.lines())
    assert json.loads(json.dumps(manifest["build"]["report"]))["auto"]["held_out_images"] == 4

    model = open_index(tmp_path / "index", load_encoders=False).model
    assert (model.k, model.weighting, model.p) == (k, weighting, p)


def test_auto_build_into_milvus_records_the_same_choice(tmp_path):
    images, pairs = write_pairs(tmp_path / "data", n_per_colour=6)
    db = str(tmp_path / "m.db")
    folder = run_build(auto_config(tmp_path, images, pairs), PixelEncoder(), HashTextEncoder())
    shared = run_build(
        auto_config(tmp_path, images, pairs, store="milvus", milvus_uri=db, out=tmp_path / "w"),
        PixelEncoder(),
        HashTextEncoder(),
    )
    assert {**shared.auto, "seconds": 0} == {**folder.auto, "seconds": 0}
    live = open_live(MilvusTarget(db))
    manifest = read_manifest(tmp_path / "index")
    assert live.manifest["defaults"] == manifest["defaults"] and live.manifest["auto"] == manifest["auto"]
    assert (live.model.k, live.model.weighting.to_dict()) == (folder.auto["k"], folder.auto["weighting"])


def cli_build(tmp_path, images, pairs, *extra):
    args = ["build", "--pairs", str(pairs), "--images-root", str(images), "--out", str(tmp_path / "index")]
    return main([*args, *ENCODERS, "--decode-workers", "0", "--force", *extra])


@pytest.mark.parametrize(
    ("extra", "weighting", "p"),
    [
        (["--weighting", "softmax", "--t", "0.05"], Weighting("softmax", 0.05), 8.0),
        (["--weighting", "rank"], Weighting("rank", 10.0), 8.0),
        (["--weighting", "rank", "--r0", "2"], Weighting("rank", 2.0), 8.0),
        (["--p", "4", "--k", "30"], Weighting("power", 4.0), 4.0),
    ],
)
def test_cli_weighting_becomes_the_served_default(tmp_path, monkeypatch, extra, weighting, p):
    monkeypatch.setenv("ASIF_PLUGIN_ENCODERS", "1")
    images, pairs = write_pairs(tmp_path / "data", n_per_colour=3)
    assert cli_build(tmp_path, images, pairs, *extra) == 0
    k = 30 if "--k" in extra else 800
    assert read_manifest(tmp_path / "index")["defaults"] == {"k": k, "p": p, "weighting": weighting.to_dict()}
    model = open_index(tmp_path / "index", load_encoders=False).model
    assert (model.k, model.weighting, model.p) == (k, weighting, p)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--weighting", "rank", "--t", "0.1"], "--t is the softmax weighting's parameter; it does not apply to "
         "--weighting rank"),
        (["--weighting", "softmax", "--p", "4"], "--p is the power weighting's parameter"),
        (["--r0", "3"], "--r0 is the rank weighting's parameter; it does not apply to --weighting power"),
        (["--auto", "--weighting", "power", "--t", "0.1"], "--t is the softmax weighting's parameter"),
        (["--weighting", "softmax", "--t", "-1"], "t must be a positive finite number"),
    ],
)  # fmt: skip
def test_cli_refuses_a_parameter_of_another_weighting(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setenv("ASIF_PLUGIN_ENCODERS", "1")
    images, pairs = write_pairs(tmp_path / "data", n_per_colour=3)
    assert cli_build(tmp_path, images, pairs, *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "index").exists()  # refused before any work


def test_cli_auto_refuses_too_few_images(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ASIF_PLUGIN_ENCODERS", "1")
    images, pairs = write_pairs(tmp_path / "data", n_per_colour=1)
    lines = pairs.read_text().splitlines()
    pairs.write_text("\n".join(lines[:5]) + "\n")  # the header and two images' captions
    assert cli_build(tmp_path, images, pairs, "--auto") == 2
    assert "--auto: holding whole images out needs at least 3 distinct images; these anchors have 2" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "index" / "manifest.json").exists()


def test_too_few_images_is_an_error_of_its_own(tmp_path):
    """The build tells too few images for --auto by the error's type (the fallback keys on it, not on its text)."""
    images, pairs = write_pairs(tmp_path / "data", n_per_colour=1)
    pairs.write_text("\n".join(pairs.read_text().splitlines()[:5]) + "\n")  # two images
    with pytest.raises(AutoTooFewImagesError, match="at least 3 distinct images; these anchors have 2"):
        run_build(auto_config(tmp_path, images, pairs), PixelEncoder(), HashTextEncoder())
    with pytest.raises(TooFewImagesError):
        holdouts(np.array([1, 1, 2], np.uint64), seed=0, splits=1)


def test_cli_auto_overrides_k_p_and_weighting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ASIF_PLUGIN_ENCODERS", "1")
    images, pairs = write_pairs(tmp_path / "data", n_per_colour=6)
    assert cli_build(tmp_path, images, pairs, "--auto", "--k", "5", "--weighting", "rank", "--seed", "2") == 0
    manifest = read_manifest(tmp_path / "index")
    assert manifest["defaults"]["k"] in AUTO_KS  # not 5
    assert manifest["defaults"]["weighting"]["kind"] in ("power", "softmax") and manifest["auto"]["seeds"] == [2, 3, 4]
    assert "auto:              k=" in capsys.readouterr().out


def test_cli_chooses_k_and_the_weighting_by_default(tmp_path, monkeypatch, capsys):
    """`asif build` with no --k/--p/--t/--r0/--weighting runs the label-free choice (issue 29); --no-auto keeps the
    paper's k=800, p=8."""
    monkeypatch.setenv("ASIF_PLUGIN_ENCODERS", "1")
    images, pairs = write_pairs(tmp_path / "data", n_per_colour=6)
    assert cli_build(tmp_path, images, pairs, "--seed", "2") == 0
    manifest = read_manifest(tmp_path / "index")
    assert manifest["auto"]["seeds"] == [2, 3, 4]
    assert manifest["auto"]["table"] and "auto:              k=" in capsys.readouterr().out
    assert cli_build(tmp_path, images, pairs, "--no-auto") == 0
    manifest = read_manifest(tmp_path / "index")
    assert "auto" not in manifest
    assert manifest["defaults"] == {"k": 800, "p": 8.0, "weighting": Weighting("power", 8.0).to_dict()}


@pytest.mark.parametrize("pin", [["--k", "30"], ["--p", "4"], ["--weighting", "rank"], ["--weighting", "power"]])
def test_cli_k_p_or_weighting_pin_the_default(tmp_path, monkeypatch, pin):
    monkeypatch.setenv("ASIF_PLUGIN_ENCODERS", "1")
    images, pairs = write_pairs(tmp_path / "data", n_per_colour=6)
    assert cli_build(tmp_path, images, pairs, *pin) == 0
    manifest = read_manifest(tmp_path / "index")
    assert "auto" not in manifest and manifest["defaults"]["k"] == (30 if pin[0] == "--k" else 800)


def test_cli_default_choice_falls_back_on_too_few_images(tmp_path, monkeypatch, capsys):
    """The default choice on 2 images (too few to hold whole images out) keeps the paper's k and p, with a note;
    an explicit --auto still refuses (test above)."""
    monkeypatch.setenv("ASIF_PLUGIN_ENCODERS", "1")
    images, pairs = write_pairs(tmp_path / "data", n_per_colour=1)
    lines = pairs.read_text().splitlines()
    pairs.write_text("\n".join(lines[:5]) + "\n")
    assert cli_build(tmp_path, images, pairs) == 0
    assert (
        "auto:              not chosen (--auto: holding whole images out needs at least 3 distinct images; "
        "these anchors have 2; recorded k=800 and power p=8)" in capsys.readouterr().out
    )
    assert read_manifest(tmp_path / "index")["defaults"]["k"] == 800
