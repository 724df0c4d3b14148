"""What the benches measure with, shared by them all: memory (``rss_mb``, ``peak_rss_mb``), latency percentiles and
the code version measured. Imports no other bench, so the benches import it and not each other (``bench/run.py``
dispatches to ``bench/live_traffic.py`` and ``bench/stores.py``, which used to import it back)."""

from __future__ import annotations

import resource
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """Seconds -> {n, p50_ms, p99_ms, max_ms}."""
    if len(samples) == 0:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    a = np.asarray(samples, dtype=np.float64) * 1000
    return {
        "n": len(a),
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "max_ms": float(a.max()),
    }


def code_version() -> dict[str, Any]:
    """The commit measured, and the files of the serving code changed in the working tree on top of it."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "asif", "app").splitlines() if line]
    return {"commit": git("rev-parse", "HEAD").strip(), "uncommitted_serving_changes": changed}
