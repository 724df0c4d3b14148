"""What a writer of the built model (:mod:`index_builder.folder_out`, :mod:`index_builder.milvus_out`) is given: the
counted anchors to read back from the shard files, ``--auto``'s selection that shares the writer's passes, and the
manifest to ask for after the last of them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from index_builder.anchor_chunks import ChunkWork
from index_builder.auto_select import HELD_OUT_PASS, NEIGHBOURS_PASS, StreamedSelection
from index_builder.config import BuildConfig
from index_builder.counting import Counted
from index_builder.report import BuildReport


@dataclass(frozen=True)
class Output:
    """The writer's inputs; the writer fills ``report`` (the index built, its time) and commits the manifest."""

    config: BuildConfig
    counted: Counted
    dims: dict[str, int]  # the vectors' dimension per role
    selection: StreamedSelection | None  # --auto's choice, made in the writer's passes (None without --auto)
    manifest: Callable[[], dict[str, Any]]  # asked for once, after the writer's last pass
    report: BuildReport
    log: TextIO

    def held_out(self) -> dict[str, ChunkWork]:
        """The selection's work in the writer's second pass (gathering the held-out rows), by name."""
        return {HELD_OUT_PASS: self.selection.gather} if self.selection is not None else {}

    def neighbours(self) -> dict[str, ChunkWork]:
        """The selection's work in the writer's last pass (searching the held-out rows' neighbours), by name."""
        return {NEIGHBOURS_PASS: self.selection.search} if self.selection is not None else {}

    def _auto_seconds(self) -> float:
        return self.selection.seconds if self.selection is not None else 0.0

    @contextmanager
    def timing_index(self) -> Iterator[None]:
        """The block's time, less the selection's work in it, becomes the report's ``index_seconds``."""
        t0, auto0 = time.perf_counter(), self._auto_seconds()
        try:
            yield
        finally:
            self.report.index_seconds = time.perf_counter() - t0 - (self._auto_seconds() - auto0)
