"""Distributed embedding of shards with Ray Data (``asif build --ray ADDRESS``).

The shards are a Ray dataset of descriptors; ``map_batches`` runs :class:`ShardEmbedder`, an actor that loads the
two encoders once and embeds a shard per call with the same :func:`embed_shard` as a single-process build. One
actor per GPU (or per CPU slot when the cluster has no GPU, its encoders on one thread each: the actors fill the
cores, not the threads of one actor). The encoders run on ``--runtime`` (auto: ONNX Runtime on CPU, torch on
CUDA). The shard files travel back through Ray's object store and the driver writes them, so the workers need no
shared filesystem; the driver then builds the index from them as usual.

``--ray local`` starts a Ray instance on this machine (what the tests run); ``--ray auto`` joins the cluster this
machine belongs to; anything else is a Ray address (``ray://head:10001`` or ``head:6379``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import numpy as np

from index_builder.errors import BuildError
from index_builder.sources import Shard, ShardError, SourceOptions


def _ray():  # the module, imported only for --ray
    try:
        import ray
    except ImportError as exc:
        raise BuildError("--ray needs Ray Data: pip install 'asif[ray]'") from exc
    return ray


class ShardEmbedder:
    """A Ray Data actor: loads the encoders once, then embeds the shards of each batch it is given."""

    def __init__(
        self,
        image_encoder: str,
        text_encoder: str,
        device: str | None,
        batch_size: int,
        max_pixels: int,
        options: dict[str, Any],
        runtime: str | None = None,
        threads: int | None = None,
    ) -> None:
        from pathlib import Path

        from asif.encoders import RuntimeOptions, load_image_encoder, load_text_encoder
        from index_builder.decode import Decoder

        run = RuntimeOptions(runtime=runtime, threads=threads)
        self.image_encoder = load_image_encoder(image_encoder, device, batch_size, run)
        self.text_encoder = load_text_encoder(text_encoder, device, batch_size, run)
        root = options.get("images_root")
        self.options = SourceOptions(**{**options, "images_root": Path(root) if root else None})
        self.batch_size = batch_size
        # Ray runs one actor per slot: decode (and prepare) in the actor
        self.decoder = Decoder(0, max_pixels, self.image_encoder.preparer())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from index_builder.shard_embed import embed_shard

        names, files, problems = [], [], []
        for descriptor in batch["shard"]:
            fields = json.loads(str(descriptor))
            shard = Shard(**{**fields, "header": tuple(fields["header"])})
            names.append(shard.name)
            try:
                emb = embed_shard(
                    shard, self.options, self.image_encoder, self.text_encoder, self.decoder, self.batch_size
                )
            except ShardError as exc:
                files.append(b"")
                problems.append(str(exc))
                continue
            files.append(emb.to_bytes())
            problems.append("")
        identity = json.dumps([self.image_encoder.identity.to_dict(), self.text_encoder.identity.to_dict()])
        return {
            "name": np.array(names, dtype=object),
            "file": np.array(files, dtype=object),
            "problem": np.array(problems, dtype=object),
            "identity": np.array([identity] * len(names), dtype=object),
        }


def connect(address: str) -> Any:
    ray = _ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        try:
            ray.init(address=None if address == "local" else address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise BuildError(f"cannot connect to Ray at {address!r}: {exc}") from exc
    return ray


def embed_with_ray(
    address: str,
    shards: Sequence[Shard],
    options: SourceOptions,
    image_encoder: str,
    text_encoder: str,
    expected_identity: list[dict[str, Any]],
    device: str | None,
    batch_size: int,
    max_pixels: int,
    on_shard: Callable[[str, bytes | None, str], None],
    log: TextIO = sys.stderr,
    runtime: str | None = None,
) -> None:
    """Embed ``shards`` on a Ray cluster; ``on_shard(name, shard file bytes or None, problem)`` per shard, as the
    results arrive (the caller writes the files, so an interrupted job keeps the shards already finished).
    ``runtime``: the encoders' runtime on the workers (None: their ``$ASIF_RUNTIME`` or auto)."""
    if not shards:
        return
    ray = connect(address)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    slots = gpus or max(1, int(resources.get("CPU", 1)))
    print(f"ray: embedding {len(shards)} shards on {slots} {'GPU' if gpus else 'CPU'} actor(s) at {address}", file=log)
    descriptors = [json.dumps(dataclasses.asdict(s)) for s in shards]
    opts = {**dataclasses.asdict(options), "images_root": str(options.images_root) if options.images_root else None}
    ds = ray.data.from_items([{"shard": d} for d in descriptors], override_num_blocks=len(descriptors))
    results = ds.map_batches(
        ShardEmbedder,
        batch_size=1,
        batch_format="numpy",
        concurrency=min(slots, len(shards)),
        num_gpus=1 if gpus else 0,
        num_cpus=1,
        fn_constructor_kwargs={
            "image_encoder": image_encoder,
            "text_encoder": text_encoder,
            "device": device,
            "batch_size": batch_size,
            "max_pixels": max_pixels,
            "options": opts,
            "runtime": runtime,
            "threads": None if gpus else 1,  # a CPU actor holds one CPU slot: one encoder thread
        },
    )
    try:
        for batch in results.iter_batches(batch_size=1, batch_format="numpy"):
            for name, data, problem, identity in zip(
                batch["name"], batch["file"], batch["problem"], batch["identity"], strict=True
            ):
                if json.loads(str(identity)) != expected_identity:
                    raise BuildError(
                        "the Ray workers' encoders differ from this machine's (another package version or weights?): "
                        f"{identity}"
                    )
                on_shard(str(name), bytes(data) if data else None, str(problem))
    except BuildError:
        raise
    except Exception as exc:  # Ray's task and user-code errors (an encoder that fails to load, out of memory):
        # the shards finished so far are kept, and the next run resumes from them
        raise BuildError(f"the Ray embedding job failed: {str(exc)[-2000:]}") from exc
