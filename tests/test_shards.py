"""`asif build` from img2dataset-style shards: webdataset tars and parquet files, per-shard resume, bad shards, Ray.

The Flickr8k tests need ../shared/data (ASIF_SHARED_DATA); they build with the packaged encoders (effnet-lite0,
MiniLM) and compare every build with the CSV build of the same pairs.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from asif.serving.loading import open_index
from asif.state.persist import load_index_folder
from index_builder.build import BuildConfig, BuildError, run_build
from index_builder.pairs_io import PairsFileError, read_pairs
from index_builder.shard_writers import write_parquet, write_webdataset
from index_builder.sources import SourceOptions, expand_braces, input_files, list_shards
from tests.conftest import HashTextEncoder, PixelEncoder, write_pair_collection

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ASIF_SHARED_DATA", ROOT.parent / "shared" / "data"))
FLICKR = SHARED / "flickr8k"
needs_flickr = pytest.mark.skipif(not (FLICKR / "captions.csv").is_file(), reason=f"no Flickr8k under {SHARED}")


def flickr_head(rows: int, folder: Path) -> Path:
    """``folder/pairs.csv``: the header and the first ``rows`` rows of Flickr8k's captions.csv (5 per image)."""
    with open(FLICKR / "captions.csv", newline="") as fh:
        reader = csv.reader(fh)
        head = [next(reader), *(row for _, row in zip(range(rows), reader, strict=False))]
    with open(folder / "pairs.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(head)
    return folder / "pairs.csv"


# ---------------------------------------------------------------------------------------------
# Reading inputs


def test_brace_patterns_and_globs(tmp_path):
    assert expand_braces("d/{000..003}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar", "d/003.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for i in (2, 0, 1):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    assert [Path(f).name for f in input_files(str(tmp_path / "*.tar"))] == ["00000.tar", "00001.tar", "00002.tar"]
    assert len(input_files(str(tmp_path / "{00000..00002}.tar"))) == 3
    with pytest.raises(PairsFileError, match="not found"):
        input_files(str(tmp_path / "{00000..00003}.tar"))
    with pytest.raises(PairsFileError, match="no files match"):
        input_files(str(tmp_path / "*.parquet"))


def test_pairs_file_shards_hold_every_row_once(tmp_path):
    """Shards are byte ranges cut at record and image boundaries; quoted captions may hold newlines."""
    lines = ["image,caption"]
    for i in range(50):
        for j in range(3):
            caption = f'"image {i}, caption {j}\nsecond line"' if j == 1 else f"image {i} caption {j}"
            lines.append(f"im{i}.jpg,{caption}")
    (tmp_path / "p.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "images").mkdir()
    options = SourceOptions(images_root=tmp_path / "images", shard_rows=10)
    kind, shards = list_shards(tmp_path / "p.csv", options, {})
    assert kind == "pairs" and len(shards) == 13  # 12 rows (4 images) per shard: 10 rounded up to an image
    got = []
    for shard in shards:
        rows = [(s.ref, s.caption) for s in shard.samples(options, Counter())]
        assert len({ref for ref, _ in rows} & {ref for ref, _ in got}) == 0  # an image's rows stay in one shard
        got.extend(rows)
    assert got == read_pairs(tmp_path / "p.csv").rows


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def colour_shards(tmp_path, n_shards=4):
    images, pairs = write_pair_collection(tmp_path / "data")
    return write_webdataset(read_pairs(pairs).rows, images, tmp_path / "shards", n_shards), images, pairs


def shard_config(tmp_path, pairs, out="index", **kw):
    kw.setdefault("decode_workers", 0)
    return BuildConfig(pairs=str(pairs), images_root=None, out=tmp_path / out, batch_size=4, k=10, **kw)


def test_bad_shards_are_counted_not_fatal(tmp_path):
    shards, images, _ = colour_shards(tmp_path)
    good = (images / "red_0.jpg").read_bytes()
    data = shards[0].parent
    whole = tar_bytes({f"x{i}.jpg": good for i in range(40)} | {f"x{i}.txt": b"a red square" for i in range(40)})
    (data / "00004.tar").write_bytes(whole[: len(whole) // 2])  # truncated mid-way
    (data / "00005.tar").write_bytes(
        tar_bytes(
            {
                "a.jpg": good,  # no caption
                "b.jpg": good,
                "b.txt": b"a red square",
                "c.jpg": b"not an image",  # undecodable
                "c.txt": b"broken",
                "d.txt": b"a caption without an image",
                "e.png": good,  # caption only in the json
                "e.json": b'{"caption": "red again"}',
            }
        )
    )
    report = run_build(shard_config(tmp_path, data / "*.tar", anchors="caption"), PixelEncoder(), HashTextEncoder())
    assert list(report.failed_shards) == ["00004.tar"] and "ReadError" in report.failed_shards["00004.tar"]
    assert report.shards == 6 and report.shards_embedded_now == 5
    assert report.skipped["samples_without_caption"] == 1 and report.skipped["samples_without_image"] == 1
    assert report.skipped["unreadable_images"] == 1
    assert report.pairs == 40 + 2  # the colour pairs, b and e
    meta = open_index(tmp_path / "index", PixelEncoder(), HashTextEncoder()).metadata
    refs = {meta.get(i).image for i in range(report.pairs)}
    assert {"00005.tar/b", "00005.tar/e"} <= refs

    # Every shard unreadable: a clear error that names why.
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.tar").write_bytes(whole[:1000])
    with pytest.raises(BuildError, match=r"no usable pairs.*x\.tar"):
        run_build(shard_config(tmp_path, tmp_path / "only" / "x.tar", out="i2"), PixelEncoder(), HashTextEncoder())


def test_parquet_without_the_named_column(tmp_path):
    pytest.importorskip("pyarrow")
    images, pairs = write_pair_collection(tmp_path / "data")
    rows = read_pairs(pairs).rows
    files = write_parquet(rows, images, tmp_path / "pq", 2, row_group_size=8)
    write_parquet(rows[:4], images, tmp_path / "pq2", 1, image_column="image")  # another layout
    (tmp_path / "pq2" / "00000.parquet").rename(tmp_path / "pq" / "zz-other.parquet")
    report = run_build(shard_config(tmp_path, tmp_path / "pq" / "*.parquet"), PixelEncoder(), HashTextEncoder())
    assert report.pairs == 40 and len(files) == 2
    why = report.failed_shards["zz-other.parquet"]
    assert "no column 'jpg'" in why and "--image-column" in why
    with pytest.raises(BuildError, match="no column 'jpg'"):
        run_build(
            shard_config(tmp_path, tmp_path / "pq" / "zz-other.parquet", out="i2"), PixelEncoder(), HashTextEncoder()
        )
    # Named explicitly, the other layout builds.
    report = run_build(
        shard_config(tmp_path, tmp_path / "pq" / "zz-other.parquet", out="i3", image_column="image"),
        PixelEncoder(),
        HashTextEncoder(),
    )
    assert report.pairs == 4 and not report.failed_shards


# ---------------------------------------------------------------------------------------------
# Kill and resume


KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from index_builder.build import BuildConfig, run_build
from tests.conftest import HashTextEncoder, PixelEncoder
done = []
def after_shard(name):
    done.append(name)
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
config = BuildConfig(pairs={pairs!r}, images_root=None, out={out!r}, batch_size=4, k=10, decode_workers=1)
run_build(config, PixelEncoder(), HashTextEncoder(), after_shard=after_shard)
"""


class CountingPixelEncoder(PixelEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.images = 0

    def encode(self, images):
        self.images += len(images)
        return super().encode(images)


def distinct_images(tar: Path) -> int:
    """Images a shard holds, counted once per content (samples sharing the bytes are embedded once)."""
    with tarfile.open(tar) as t:
        return len({t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".jpg")})


def stores_equal(a: Path, b: Path, n: int) -> None:
    fa, fb = load_index_folder(a), load_index_folder(b)
    ids = np.arange(n)
    for role in ("image_store", "text_store"):
        np.testing.assert_array_equal(getattr(fa, role).reconstruct(ids), getattr(fb, role).reconstruct(ids))


def test_killed_build_resumes_per_shard(tmp_path):
    shards, _, _ = colour_shards(tmp_path, n_shards=5)
    pattern = str(shards[0].parent / "{00000..00004}.tar")
    out = tmp_path / "index"
    script = KILLER.format(root=str(ROOT), pairs=pattern, out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL after two shard files were written
    assert len(list((out / ".build" / "shards").glob("*.npz"))) == 2 and not (out / "manifest.json").exists()

    enc = CountingPixelEncoder()
    report = run_build(shard_config(tmp_path, pattern), enc, HashTextEncoder())
    assert report.shards_resumed == 2 and report.shards_embedded_now == 3
    per_shard = [distinct_images(s) for s in shards]
    assert enc.images == sum(per_shard[2:])  # the two finished shards were not embedded again
    fresh = run_build(shard_config(tmp_path, pattern, out="fresh"), PixelEncoder(), HashTextEncoder())
    assert fresh.pairs == report.pairs == 40
    stores_equal(out, tmp_path / "fresh", report.pairs)
    a = open_index(out, PixelEncoder(), HashTextEncoder()).metadata
    b = open_index(tmp_path / "fresh", PixelEncoder(), HashTextEncoder()).metadata
    assert [a.get(i) for i in range(40)] == [b.get(i) for i in range(40)]


# ---------------------------------------------------------------------------------------------
# Flickr8k: the same pairs as CSV, webdataset and parquet give the same model (packaged encoders)


@pytest.fixture(scope="module")
def flickr_subset(tmp_path_factory):
    rows = read_pairs(FLICKR / "captions.csv").rows[: 40 * 5]  # 40 images, 5 captions each
    root = tmp_path_factory.mktemp("flickr_subset")
    (root / "pairs.csv").write_text("image,caption\n" + "".join(f'{i},"{c}"\n' for i, c in rows))
    tars = write_webdataset(rows, FLICKR / "images", root / "tar", 4)
    return root, rows, tars


@pytest.fixture(scope="module")
def packaged_encoders():
    from asif.encoders import load_image_encoder, load_text_encoder

    return load_image_encoder("effnet-lite0", "cpu", 16), load_text_encoder("minilm", "cpu", 16)


def queries(image_encoder) -> np.ndarray:
    from asif.encoders.images import open_image

    names = sorted(p.name for p in (FLICKR / "images").iterdir())[-12:]  # images outside the subset
    return image_encoder.encode([open_image(FLICKR / "images" / n) for n in names])


def assert_same_model(a: Path, b: Path, image_encoder, text_encoder) -> None:
    ma, mb = open_index(a, image_encoder, text_encoder), open_index(b, image_encoder, text_encoder)
    n = ma.model.n_pairs
    assert n == mb.model.n_pairs
    assert [ma.metadata.get(i).captions for i in range(n)] == [mb.metadata.get(i).captions for i in range(n)]
    ids = np.arange(n)
    for role in ("image_store", "text_store"):
        np.testing.assert_allclose(
            getattr(ma.model, role).reconstruct(ids), getattr(mb.model, role).reconstruct(ids), atol=2e-5
        )
    q = queries(image_encoder)
    np.testing.assert_array_equal(ma.model.image_store.search(q, 20)[1], mb.model.image_store.search(q, 20)[1])
    labels = text_encoder.encode(["a dog", "a child", "a bicycle", "the sea"])
    np.testing.assert_allclose(ma.model.similarity(q, labels, k=50), mb.model.similarity(q, labels, k=50), atol=1e-4)


@needs_flickr
@pytest.mark.slow
def test_webdataset_and_parquet_builds_equal_the_csv_build(tmp_path, flickr_subset, packaged_encoders):
    pytest.importorskip("pyarrow")
    root, rows, _ = flickr_subset
    image_encoder, text_encoder = packaged_encoders
    csv_cfg = BuildConfig(
        pairs=root / "pairs.csv", images_root=FLICKR / "images", out=tmp_path / "csv", shard_rows=64, decode_workers=0
    )
    csv_report = run_build(csv_cfg, image_encoder, text_encoder)
    assert csv_report.pairs == 200 and csv_report.images == 40

    tar_report = run_build(
        BuildConfig(pairs=str(root / "tar" / "{00000..00003}.tar"), images_root=None, out=tmp_path / "tar"),
        image_encoder,
        text_encoder,
    )  # default decode workers: processes
    assert tar_report.pairs == 200 and tar_report.images == 40 and tar_report.shards == 4
    assert tar_report.decode_workers >= 1
    assert_same_model(tmp_path / "csv", tmp_path / "tar", image_encoder, text_encoder)
    meta = open_index(tmp_path / "tar", image_encoder, text_encoder).metadata
    assert meta.get(0).image == "00000.tar/000000000"  # source shard and sample key
    assert meta.thumbnail("00000.tar/000000000")[:2] == b"\xff\xd8"

    files = write_parquet(rows, FLICKR / "images", tmp_path / "pq", 2, row_group_size=30)
    pq_report = run_build(
        BuildConfig(pairs=str(tmp_path / "pq" / "*.parquet"), images_root=None, out=tmp_path / "parquet"),
        image_encoder,
        text_encoder,
    )
    assert len(files) == 2 and pq_report.shards == 8  # 100 rows per file in row groups of 30
    assert pq_report.pairs == 200
    assert_same_model(tmp_path / "csv", tmp_path / "parquet", image_encoder, text_encoder)

    # --anchors image groups an image's captions within its shard, as the CSV build does.
    builds = [("csv-img", root / "pairs.csv", FLICKR / "images"), ("tar-img", str(root / "tar" / "*.tar"), None)]
    for name, pairs, images_root in builds:
        run_build(
            BuildConfig(pairs=pairs, images_root=images_root, out=tmp_path / name, anchors="image", decode_workers=0),
            image_encoder,
            text_encoder,
        )
    assert_same_model(tmp_path / "csv-img", tmp_path / "tar-img", image_encoder, text_encoder)


@needs_flickr
@pytest.mark.slow
def test_ray_local_build_equals_single_process_build(tmp_path, flickr_subset, packaged_encoders):
    ray = pytest.importorskip("ray")
    root, _, _ = flickr_subset
    image_encoder, text_encoder = packaged_encoders
    pattern = str(root / "tar" / "*.tar")
    single = BuildConfig(
        pairs=pattern, images_root=None, out=tmp_path / "single", image_encoder="effnet-lite0", decode_workers=0
    )
    run_build(single, image_encoder, text_encoder)
    distributed = BuildConfig(
        pairs=pattern, images_root=None, out=tmp_path / "ray", image_encoder="effnet-lite0", ray="local"
    )
    try:
        report = run_build(distributed, image_encoder, text_encoder)
    finally:
        ray.shutdown()
    assert report.shards_embedded_now == 4 and report.pairs == 200 and not report.failed_shards
    assert report.images_embedded_now == 40
    assert_same_model(tmp_path / "single", tmp_path / "ray", image_encoder, text_encoder)


@pytest.mark.slow
def test_cli_builds_from_shards(tmp_path, capsys):
    from cli.main import main

    shards, _, pairs = colour_shards(tmp_path)
    out = tmp_path / "index"
    encoders = ["--image-encoder", "effnet-lite0", "--text-encoder", "minilm"]
    pattern = str(shards[0].parent / "{00000..00003}.tar")
    assert main(["build", "--pairs", pattern, "--out", str(out), "--decode-workers", "0", *encoders]) == 0
    printed = capsys.readouterr().out
    assert "anchors (pairs):   40" in printed and "shards:            4 (4 embedded now" in printed
    for stage in ("read:", "decode:", "images embedded:", "captions embedded:", "index build:"):
        assert stage in printed
    assert open_index(out).model.n_pairs == 40
    # A pairs file still needs its images root; a pattern that matches nothing is a clear error.
    assert main(["build", "--pairs", str(pairs), "--out", str(tmp_path / "x"), *encoders]) == 2
    assert "--images-root" in capsys.readouterr().err
    assert main(["build", "--pairs", str(tmp_path / "none" / "*.tar"), "--out", str(tmp_path / "y"), *encoders]) == 2
    assert "no files match" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_job_failure_is_a_clear_error(tmp_path):
    ray = pytest.importorskip("ray")
    shards, _, _ = colour_shards(tmp_path, n_shards=2)
    config = shard_config(tmp_path, shards[0].parent / "*.tar", ray="local", image_encoder="no-such-encoder")
    try:
        with pytest.raises(BuildError, match="Ray embedding job failed"):
            run_build(config, PixelEncoder(), HashTextEncoder())
    finally:
        ray.shutdown()
