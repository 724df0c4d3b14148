"""The build's work folder, ``<out>/.build``: one embedding file per shard under ``shards/``, and ``state.json``
with the fingerprint of the settings the files were embedded with, so a killed build resumes shard by shard and a
change of encoders or columns starts over."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, TextIO

from asif.state.persist import write_json_atomic
from index_builder.config import BuildConfig
from index_builder.shard_embed import stored_meta
from index_builder.sources import Shard

WORK_DIR = ".build"


def fingerprint(config: BuildConfig, kind: str, image_id: dict[str, Any], text_id: dict[str, Any]) -> str:
    """What every shard file depends on beyond its own input (which each file's fingerprint covers)."""
    settings = [
        kind,
        str(Path(config.images_root).resolve()) if config.images_root else None,
        image_id,
        text_id,
        config.max_pixels,
        config.image_column,
        config.caption_column,
        config.key_column,
    ]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def prepare_work_dir(work: Path, fingerprint: str, log: TextIO) -> None:
    """Keep ``work`` when it was made with the same ``fingerprint`` (a resumed build), else start it over."""
    state = work / "state.json"
    if work.exists():
        try:
            same = json.loads(state.read_text())["fingerprint"] == fingerprint
        except (OSError, ValueError, KeyError):
            same = False
        if not same:
            print("encoders or settings changed since the interrupted build: starting over", file=log)
            shutil.rmtree(work)
    (work / "shards").mkdir(parents=True, exist_ok=True)
    if not state.exists():
        write_json_atomic(state, {"fingerprint": fingerprint})


def shard_file(work: Path, shard: Shard) -> Path:
    """Where the embedding file of ``shard`` lives."""
    return work / "shards" / (hashlib.sha1(shard.name.encode()).hexdigest()[:20] + ".npz")


def pending_shards(work: Path, shards: list[Shard]) -> tuple[list[Shard], int, int]:
    """(the shards still to embed, the number resumed, their distinct images): a shard is resumed when its file
    holds the embedding of its current input."""
    todo, resumed, images = [], 0, 0
    for shard in shards:
        meta = stored_meta(shard_file(work, shard))
        if meta is not None and meta["fingerprint"] == shard.fingerprint():
            resumed += 1
            images += int(meta.get("times", {}).get("images", 0))
        else:
            todo.append(shard)
    return todo, resumed, images
