"""What the end-to-end bench (``bench/e2e.py``) runs on: the encoders, the index sizes, the photos, labels and
captions it sends, and the indices it serves (the Flickr8k demo index, built if missing, and synthetic indices whose
manifest names the real encoders, cached)."""

from __future__ import annotations

import csv
import gc
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from asif.encoders import load_image_encoder, load_text_encoder
from asif.state.persist import MANIFEST, read_manifest, write_json_atomic
from asif.tuning.synthetic import SyntheticWorld
from bench.e2e_server import server_env
from bench.synthetic_index import D_IMAGE, D_TEXT, N_CLASSES, write_index

IMAGE_SPEC, TEXT_SPEC = "effnet-lite0", "minilm"


# -- inputs --------------------------------------------------------------------------------------------------
def parse_size(token: str) -> int | str:
    """``demo`` or a pair count: ``1m``, ``100k``, ``250000``."""
    token = token.strip().lower()
    if token == "demo":
        return token
    scale = {"k": 1_000, "m": 1_000_000}.get(token[-1:], 1)
    return int(float(token.rstrip("km")) * scale)


def size_name(size: int | str) -> str:
    if isinstance(size, str):
        return size
    return f"{size // 1_000_000}m" if size % 1_000_000 == 0 else f"{size // 1_000}k" if size % 1_000 == 0 else str(size)


def load_photos(root: Path, seed: int) -> list[bytes]:
    """Every Imagenette val JPEG's bytes, in a seeded random order."""
    paths = sorted(root.glob("*/*.jpg")) + sorted(root.glob("*/*.JPEG"))
    if not paths:
        raise SystemExit(f"no JPEGs under {root}")
    order = np.random.default_rng(seed).permutation(len(paths))
    return [paths[i].read_bytes() for i in order]


def load_classes(path: Path) -> list[str]:
    return [line.split("\t")[1].strip() for line in path.read_text().splitlines() if "\t" in line]


def load_captions(path: Path, n: int) -> list[str]:
    """n distinct Flickr8k captions, one per image (every fifth row)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [row["caption"] for row in csv.DictReader(fh)]
    return list(dict.fromkeys(rows[::5]))[:n]


# -- the indices ---------------------------------------------------------------------------------------------
def ensure_demo(folder: Path, data: Path) -> dict[str, Any]:
    """The Flickr8k demo index, built if missing."""
    if (folder / MANIFEST).is_file():
        return {"built": False}
    cmd = [
        str(Path(sys.executable).with_name("asif")),
        "build",
        "--pairs",
        str(data / "flickr8k" / "captions.csv"),
        "--images-root",
        str(data / "flickr8k" / "images"),
        "--out",
        str(folder),
        "--image-encoder",
        IMAGE_SPEC,
        "--text-encoder",
        TEXT_SPEC,
    ]
    print("building the demo index:", " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=server_env())
    return {"built": True, "build_s": time.perf_counter() - t}


def real_identities() -> dict[str, dict[str, Any]]:
    image, text = load_image_encoder(IMAGE_SPEC), load_text_encoder(TEXT_SPEC)
    return {"image_encoder": image.identity.to_dict(), "text_encoder": text.identity.to_dict()}


def ensure_synthetic(cache: Path, n: int, identities: dict[str, dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """n synthetic pairs whose manifest names the real encoders; reused when cached with the same identities."""
    folder = cache / f"synthetic-{n}"
    if (folder / MANIFEST).is_file():
        manifest = read_manifest(folder)
        same = all(manifest.get(role) == ident for role, ident in identities.items())
        if same and int(manifest.get("counts", {}).get("pairs", -1)) == n:
            return folder, {"cached": True}
    partial = cache / f"synthetic-{n}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    print(f"writing {n:,} synthetic pairs to {folder} ...", flush=True)
    info = write_index(partial, SyntheticWorld(d_image=D_IMAGE, d_text=D_TEXT, n_classes=N_CLASSES, seed=0), n)
    manifest = read_manifest(partial)
    manifest.update(identities)  # encoder identities are not covered by the files' checksums
    write_json_atomic(partial / MANIFEST, manifest)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    gc.collect()
    return folder, {"cached": False, **{k: v for k, v in info.items() if k != "rss_mb_with_stores"}}
