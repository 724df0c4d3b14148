"""`asif build`'s report: the counts, the shards embedded and resumed, the time of each stage, the index built and
``--auto``'s choice, as printed at the end and kept in the manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from asif.math.relrep import Weighting
from index_builder.shard_embed import StageTimes

SKIP_REASONS = (
    "empty_captions",
    "bad_lines",
    "unsafe_paths",
    "samples_without_image",
    "samples_without_caption",
    "unreadable_images",
    "captions_of_unreadable_images",
)


@dataclass
class BuildReport:
    rows: int = 0  # samples read, with those skipped
    captions: int = 0
    images: int = 0
    pairs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    shards_embedded_now: int = 0
    shards_resumed: int = 0
    images_resumed: int = 0  # distinct images of the resumed shards
    failed_shards: dict[str, str] = field(default_factory=dict)  # shard -> why it was skipped
    images_embedded_now: int = 0
    captions_embedded_now: int = 0
    stages: StageTimes = field(default_factory=StageTimes)  # of the shards embedded by this run
    decode_workers: int = 0
    embed_seconds: float = 0.0  # wall time of the embedding step
    index_seconds: float = 0.0
    total_seconds: float = 0.0
    index: dict[str, Any] = field(default_factory=dict)
    auto: dict[str, Any] = field(default_factory=dict)  # with --auto: the choice (k, weighting, mrr, ...)

    def lines(self) -> list[str]:
        st = self.stages

        def rate(n: int, s: float, unit: str, per: str = "") -> str:
            return f"{n} in {s:.1f} s ({n / s:.1f} {unit}/s{per})" if s > 0 and n else f"{n}"

        skipped = ", ".join(f"{k}={v}" for k, v in self.skipped.items() if v) or "none"
        workers = max(1, self.decode_workers)
        waited = f"; the encoder waited {st.wait_seconds:.1f} s for it" if st.images else ""
        out = [
            f"rows read:         {self.rows}",
            f"captions used:     {self.captions}",
            f"distinct images:   {self.images}",
            f"anchors (pairs):   {self.pairs}",
            f"skipped:           {skipped}",
            f"shards:            {self.shards} ({self.shards_embedded_now} embedded now, {self.shards_resumed} "
            f"resumed, {len(self.failed_shards)} failed)",
        ]
        out += [f"  failed {name}: {why}" for name, why in self.failed_shards.items()]
        out += [
            f"read:              {rate(st.samples, st.read_seconds, 'samples')}",
            f"decode:            {rate(st.images, st.decode_seconds / workers, 'img', f', {workers} workers')}{waited}",
            f"images embedded:   {rate(self.images_embedded_now, st.image_seconds, 'img')}",
            f"captions embedded: {rate(self.captions_embedded_now, st.caption_seconds, 'captions')}",
            f"embedding wall:    {rate(self.images_embedded_now, self.embed_seconds, 'img')}",
            f"index build:       {rate(self.pairs, self.index_seconds, 'pairs')} (image {self.index.get('image')}, "
            f"text {self.index.get('text')})",
            f"total:             {self.total_seconds:.1f} s",
        ]
        if "not_chosen" in self.auto:
            out.insert(-1, f"auto:              not chosen ({self.auto['not_chosen']})")
        elif self.auto:
            chosen = Weighting(**self.auto["weighting"]).describe()
            out.insert(-1, f"auto:              k={self.auto['k']}, {chosen} (held-out mrr {self.auto['mrr']:.3f} "
                       f"over {self.auto['held_out_images']} images x {len(self.auto['seeds'])} splits, "
                       f"{self.auto['seconds']:.1f} s)")  # fmt: skip
        return out
