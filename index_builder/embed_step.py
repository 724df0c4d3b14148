"""`asif build`'s embedding step: every shard not embedded yet is embedded (decoding in worker processes, or on a
Ray cluster) and written to the work folder as it finishes, under a progress bar of the images embedded."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from asif.encoders import ImageEncoder, TextEncoder
from index_builder.config import BuildConfig
from index_builder.decode import Decoder
from index_builder.report import BuildReport
from index_builder.shard_embed import ShardEmbedding, embed_shard, write_atomic
from index_builder.sources import Shard, ShardError, SourceOptions
from index_builder.work_dir import shard_file


def embed(
    config: BuildConfig,
    options: SourceOptions,
    todo: list[Shard],
    work: Path,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    identity: list[dict[str, Any]],
    report: BuildReport,
    log: TextIO,
    after_shard: Callable[[str], None] | None,
) -> None:
    """Embed the shards not embedded yet, writing one file per shard as each finishes."""
    by_name = {s.name: s for s in todo}
    progress = Progress(report.shards, report.shards_resumed, report.images_resumed, log)
    t0 = time.perf_counter()

    def finished(name: str, emb: ShardEmbedding | None, data: bytes | None, problem: str) -> None:
        if problem:
            print(f"skipping shard {problem}", file=log)
            report.failed_shards[name] = problem
        else:
            if emb is None:
                assert data is not None
                write_atomic(shard_file(work, by_name[name]), data)
                emb = ShardEmbedding.from_file(shard_file(work, by_name[name]))
            else:
                write_atomic(shard_file(work, by_name[name]), emb.to_bytes())
            report.stages.add(emb.times)
            report.shards_embedded_now += 1
            report.images_embedded_now += emb.times.images
            report.captions_embedded_now += emb.times.captions
        progress.shard_done(emb.times.images if emb is not None else 0)
        if after_shard is not None:
            after_shard(name)

    try:
        if config.ray:
            from index_builder.ray_embed import embed_with_ray

            report.decode_workers = 1
            embed_with_ray(
                config.ray, todo, options, config.image_encoder, config.text_encoder, identity, config.device,
                config.batch_size, config.max_pixels,
                lambda name, data, problem: finished(name, None, data, problem), log, runtime=config.runtime,
            )  # fmt: skip
        else:
            report.decode_workers = config.decode_workers
            # the workers decode, thumbnail and prepare; this process runs the encoder's network only
            decoder = Decoder(config.decode_workers if todo else 0, config.max_pixels, image_encoder.preparer())
            with decoder:
                for shard in todo:
                    try:
                        emb = embed_shard(
                            shard, options, image_encoder, text_encoder, decoder, config.batch_size,
                            on_images=progress.images,
                        )  # fmt: skip
                    except ShardError as exc:
                        finished(shard.name, None, None, str(exc))
                        continue
                    finished(shard.name, emb, None, "")
    finally:
        progress.close()
        report.embed_seconds = time.perf_counter() - t0


class Progress:
    """The embedding step's progress bar: images embedded so far (those of resumed shards included), moved after
    every encoder batch, with tqdm's img/s and the shards done out of all in the postfix.

    A shard embedded elsewhere (Ray) moves the bar by its images when its file arrives."""

    def __init__(self, shards: int, resumed: int, resumed_images: int, file: TextIO) -> None:
        self.shards, self.done, self.in_shard = shards, resumed, 0
        self.bar = tqdm(initial=resumed_images, desc="embedding", unit="img", file=file, postfix=self._shards())

    def _shards(self) -> str:
        return f"{self.done}/{self.shards} shards"

    def images(self, n: int) -> None:
        self.in_shard += n
        self.bar.update(n)

    def shard_done(self, images: int) -> None:
        """A shard finished (or failed: ``images`` 0) with ``images`` images, some perhaps counted already."""
        self.done += 1
        self.bar.set_postfix_str(self._shards(), refresh=False)
        self.bar.update(max(0, images - self.in_shard))
        self.bar.refresh()
        self.in_shard = 0

    def close(self) -> None:
        self.bar.close()
