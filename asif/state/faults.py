"""Failure injection for the fault-injection tests: inert unless ``ASIF_FAILPOINTS`` names a file.

That file holds ``point=action`` lines, read again at every hit, so a test can switch faults on and off in a
running server:

- ``milvus.log_intents=error`` / ``milvus.commit=error``: raise ``InjectedFault`` at that step of a shared edit;
- ``shared.before_commit=kill``: the process kills itself (SIGKILL) after the stores changed, before the commit;
- ``clock.offset_s=-40``: the wall clock this process uses for ids and timestamps runs 40 s behind.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


class InjectedFault(RuntimeError):
    """A failure a test asked for."""


def _points() -> dict[str, str]:
    path = os.environ.get("ASIF_FAILPOINTS")
    if not path:
        return {}
    try:
        text = Path(path).read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        point, eq, action = line.strip().partition("=")
        if eq:
            out[point.strip()] = action.strip()
    return out


def hit(point: str) -> None:
    """Fail here if the test asked for it."""
    action = _points().get(point)
    if action == "error":
        raise InjectedFault(f"injected failure at {point}")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


def clock_offset_s() -> float:
    """Seconds to add to the wall clock (0 unless a test set ``clock.offset_s``)."""
    value = _points().get("clock.offset_s")
    return float(value) if value else 0.0
