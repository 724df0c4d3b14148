"""How often `asif build` reads each shard embedding file: the counts and the image keys in one pass, the held-out
rows (with --auto) and the training sample in a second, the fill (or the Milvus load) and the held-out rows'
neighbours in a third, with --auto or without, into an index folder or Milvus."""

from __future__ import annotations

from collections import Counter

import pytest

from index_builder.build import BuildConfig, run_build
from index_builder.shard_embed import ShardEmbedding
from tests.conftest import HashTextEncoder, PixelEncoder
from tests.test_build_auto import write_pairs


@pytest.fixture
def reads(monkeypatch):
    """Per shard file, how many times the build read it back."""
    counts: Counter[str] = Counter()
    from_file = ShardEmbedding.from_file

    def counted(path):
        counts[str(path)] += 1
        return from_file(path)

    monkeypatch.setattr(ShardEmbedding, "from_file", counted)
    return counts


@pytest.mark.parametrize(
    ("auto", "store", "index_type", "most"),
    [
        (True, "faiss", "ivfpq", 3),  # count + keys; held-out rows + training sample; fill + neighbours
        (False, "faiss", "ivfpq", 3),  # count; training sample; fill
        (True, "faiss", "auto", 3),  # a flat index needs no training sample
        (False, "faiss", "auto", 2),
        (True, "milvus", "auto", 3),  # count + keys; held-out rows; load + neighbours
        (False, "milvus", "auto", 2),
    ],
)
def test_each_shard_file_is_read_at_most_three_times(tmp_path, reads, auto, store, index_type, most):
    images, pairs = write_pairs(tmp_path / "data", n_per_colour=6)
    config = BuildConfig(
        pairs=pairs,
        images_root=images,
        out=tmp_path / "out",
        shard_rows=10,
        decode_workers=0,
        auto=auto,
        index_type=index_type,
        store=store,
        milvus_uri=str(tmp_path / "m.db"),
    )
    report = run_build(config, PixelEncoder(), HashTextEncoder())
    assert report.shards == 5 and bool(report.auto) == auto
    if index_type == "ivfpq":
        assert report.index["image"].startswith("IVF")  # trained on a sample read back
    assert len(reads) == report.shards  # every shard file was read back
    assert max(reads.values()) == most, reads
