"""Build throughput and peak memory: a pairs file against webdataset shards, and a flat-memory check at 1M pairs.

    python bench/build_shards.py flickr --shards 16 --json bench/build_shards_flickr.json
    python bench/build_shards.py synthetic --sizes 100000,1000000 --json bench/build_shards_synthetic.json

``flickr``: Flickr8k (40,450 pairs, ../shared/data) built twice with the same encoders, once from captions.csv and
once from the same pairs written as webdataset tar shards (each sample carries its image's bytes; an image's five
captions share a shard). ``synthetic``: N distinct 16x16 JPEGs with captions in tar shards of 10,000, embedded by
stub encoders (a seeded projection of the pixels to 1280-d and of a hashed bag of words to 384-d, so the build's own
costs dominate), IVF-PQ without re-ranking tables, so the index is small and any growth of the build's memory with
N would show. Every build runs in its own process; peak RSS is that process's maximum (plus its decode workers').
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asif.encoders.base import EncoderIdentity, ImageEncoder, TextEncoder  # noqa: E402
from asif.math.normalise import l2_normalise  # noqa: E402

SHARED = Path(os.environ.get("ASIF_SHARED_DATA", ROOT.parent / "shared" / "data"))


class StubImageEncoder(ImageEncoder):
    """16x16 grey pixels -> a fixed random projection to 1280-d: deterministic, and fast next to decoding."""

    def __init__(self) -> None:
        self.identity = EncoderIdentity("py:bench.build_shards:StubImageEncoder", "stub-image", "image", 1280, {})
        self.proj = np.random.default_rng(0).standard_normal((256, 1280)).astype(np.float32)

    def encode(self, images):
        x = np.stack([np.asarray(im.convert("L").resize((16, 16)), dtype=np.float32).ravel() for im in images])
        return l2_normalise((x - 127.5) @ self.proj)


class StubTextEncoder(TextEncoder):
    def __init__(self) -> None:
        self.identity = EncoderIdentity("py:bench.build_shards:StubTextEncoder", "stub-text", "text", 384, {})

    def encode(self, texts):
        out = np.full((len(texts), 384), 1e-3, np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, zlib.crc32(w.encode()) % 384] += 1.0
        return l2_normalise(out)


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def one(args: dict) -> dict:
    """A single build in this process (run by the parent in a fresh subprocess)."""
    from index_builder.build import BuildConfig, run_build

    stub = args.pop("stub", False)
    config = BuildConfig(**args)
    encoders = (StubImageEncoder(), StubTextEncoder()) if stub else (None, None)
    t0 = time.perf_counter()
    report = run_build(config, *encoders)
    wall = time.perf_counter() - t0
    st = report.stages
    return {
        "pairs": report.pairs,
        "images": report.images,
        "shards": report.shards,
        "wall_s": round(wall, 1),
        "embed_wall_s": round(report.embed_seconds, 1),
        "index_s": round(report.index_seconds, 1),
        "pairs_per_s": round(report.pairs / wall, 1),
        "images_per_s_wall": round(report.images_embedded_now / max(report.embed_seconds, 1e-9), 1),
        "read_samples_per_s": round(st.samples / max(st.read_seconds, 1e-9), 1),
        "decode_img_per_s": round(st.images / max(st.decode_seconds / max(report.decode_workers, 1), 1e-9), 1),
        "decode_workers": report.decode_workers,
        "encode_img_per_s": round(st.images / max(st.image_seconds, 1e-9), 1),
        "encode_captions_per_s": round(st.captions / max(st.caption_seconds, 1e-9), 1),
        "index_pairs_per_s": round(report.pairs / max(report.index_seconds, 1e-9), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "index_folder_mb": round(folder_mb(Path(config.out)), 1),
        "index": report.index,
    }


def run_one(args: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "_one", json.dumps(args, default=str)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(f"build failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_synthetic_shards(folder: Path, n: int, per_shard: int = 10_000) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["dog", "cat", "red", "blue", "runs", "sits", "on", "the", "grass", "beach", "a", "street", "child"]
    n_shards = -(-n // per_shard)
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
                caption = " ".join(rng.choice(words, 8)) + f" {i}"
                for name, blob in ((f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")


def print_table(rows: list[dict], keys: list[str]) -> None:
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "_one":
        print(json.dumps(one(json.loads(sys.argv[2]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("flickr", "synthetic"))
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--image-encoder", default="effnet-lite0")
    ap.add_argument("--text-encoder", default="minilm")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="asif-build-bench-"))
    results: list[dict] = []
    if args.what == "flickr":
        from index_builder.pairs_io import read_pairs
        from index_builder.shard_writers import write_webdataset

        flickr = SHARED / "flickr8k"
        rows = read_pairs(flickr / "captions.csv").rows
        write_webdataset(rows, flickr / "images", work / "tar", args.shards)
        common = {"image_encoder": args.image_encoder, "text_encoder": args.text_encoder, "batch_size": 32}
        csv = {"pairs": str(flickr / "captions.csv"), "images_root": str(flickr / "images"), "out": str(work / "csv")}
        tar = {"pairs": str(work / "tar" / "*.tar"), "images_root": None, "out": str(work / "tar-index")}
        for name, build in (("captions.csv", csv), (f"{args.shards} webdataset shards", tar)):
            print(f"building from {name} ...", file=sys.stderr)
            results.append({"input": name, **run_one({**common, **build})})
    else:
        for n in [int(s) for s in args.sizes.split(",")]:
            print(f"writing {n} synthetic samples ...", file=sys.stderr)
            pattern = write_synthetic_shards(work / f"syn{n}", n)
            build = {"pairs": pattern, "images_root": None, "out": str(work / f"syn{n}-index"), "stub": True}
            build |= {"index_type": "ivfpq", "rerank": None, "batch_size": 256}
            results.append({"input": f"{n:,} synthetic pairs", **run_one(build)})
    keys = [
        "input", "pairs", "wall_s", "pairs_per_s", "images_per_s_wall", "read_samples_per_s", "decode_img_per_s",
        "encode_img_per_s", "encode_captions_per_s", "index_pairs_per_s", "peak_rss_mb", "index_folder_mb",
    ]  # fmt: skip
    print_table(results, keys)
    if args.json:
        args.json.write_text(json.dumps({"what": args.what, "cpus": os.cpu_count(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
