"""The end-to-end bench's floor (``bench/e2e.py``), measured in process while no server runs: the image encoder alone
under each runtime at batch 1 and batch 32, the network alone and decode + prepare + network, and the text encoder at
batch 1; measured again while other processes used the cores."""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from asif.encoders import load_image_encoder, load_text_encoder
from asif.encoders.images import open_image
from bench.e2e_inputs import IMAGE_SPEC, TEXT_SPEC
from bench.e2e_server import NOISY, Others, wait_for_quiet
from bench.measure import percentiles


def time_calls(fn: Callable[[Any], object], items: Sequence[Any], warmup: int = 3) -> list[float]:
    for item in items[:warmup]:
        fn(item)
    times = []
    for item in items:
        t = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - t)
    return times


def image_floor(runtime: str, photos: list[bytes], n1: int, n32: int) -> dict[str, Any]:
    enc = load_image_encoder(IMAGE_SPEC, runtime=runtime)
    singles = photos[:n1]
    prepared = [enc.prepare(open_image(b)) for b in singles]
    batches = [photos[i * 32 : (i + 1) * 32] for i in range(n32)]
    prepared_batches = [[enc.prepare(open_image(b)) for b in batch] for batch in batches]

    def full(blobs: Sequence[bytes]) -> np.ndarray:
        return enc.encode_prepared([enc.prepare(open_image(b)) for b in blobs])

    runtime_used = getattr(getattr(enc, "forward", None), "runtime", runtime)
    out: dict[str, Any] = {
        "runtime": runtime_used,
        "decode_prepare": percentiles(time_calls(lambda b: enc.prepare(open_image(b)), singles)),
        "net_b1": percentiles(time_calls(lambda p: enc.encode_prepared([p]), prepared)),
        "full_b1": percentiles(time_calls(lambda b: full([b]), singles)),
        "net_b32": percentiles(time_calls(enc.encode_prepared, prepared_batches, warmup=1)),
        "full_b32": percentiles(time_calls(full, batches, warmup=1)),
    }
    for kind in ("net", "full"):
        p50 = out[f"{kind}_b32"]["p50_ms"]
        out[f"{kind}_b32_ms_per_image"], out[f"{kind}_b32_images_per_s"] = p50 / 32, 32_000 / p50
    return out


def text_floor(runtime: str, captions: list[str]) -> dict[str, Any]:
    enc = load_text_encoder(TEXT_SPEC, runtime=runtime)
    return percentiles(time_calls(lambda c: enc.encode([c]), captions))


def floor_once(runtime: str, photos: list[bytes], captions: list[str], args: argparse.Namespace) -> dict[str, Any]:
    quiet = wait_for_quiet(args.quiet_wait)
    others = Others(time.process_time)
    out = image_floor(runtime, photos, args.floor_singles, args.floor_batches)
    out["text_b1"] = text_floor(runtime, captions[: args.floor_singles])
    out.update(quiet_wait=quiet, others_cores=others.cores())
    gc.collect()
    return out


def floor(
    runtimes: Sequence[str], photos: list[bytes], captions: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Each runtime's floor; measured again (up to --floor-tries) while other processes used the cores."""
    out: dict[str, Any] = {}
    for runtime in runtimes:
        for attempt in range(1, args.floor_tries + 1):
            print(f"floor: {runtime} (try {attempt}) ...", flush=True)
            res = floor_once(runtime, photos, captions, args)
            res["tries"] = attempt
            if runtime not in out or res["others_cores"] < out[runtime]["others_cores"]:
                out[runtime] = res
            if res["others_cores"] <= NOISY:
                break
    return out
