"""The server the end-to-end bench (``bench/e2e.py``) measures and the machine it shares: ``asif serve`` as a
subprocess (``Server``: readiness, CPU time, stop), the ``/metrics`` scrape and its deltas, and the cores other
processes use (``machine_busy_s``, ``Others``, ``wait_for_quiet``), so that figures taken under contention are
flagged."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.e2e_client import Client

NOISY = 0.25  # cores used by other processes above which a figure is flagged


# -- other processes -----------------------------------------------------------------------------------------
def machine_busy_s() -> float:
    """CPU seconds every process of the machine has used (``/proc/stat``: all but idle and iowait)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class Others:
    """Cores used by processes other than this one (and the server) over a stretch of time: contention."""

    def __init__(self, own_cpu: Callable[[], float]) -> None:
        self.own_cpu = own_cpu
        self.t0, self.busy0, self.own0 = time.perf_counter(), machine_busy_s(), own_cpu()

    def cores(self) -> float:
        busy, own = machine_busy_s() - self.busy0, self.own_cpu() - self.own0
        return max(0.0, busy - own) / max(time.perf_counter() - self.t0, 1e-9)


def wait_for_quiet(max_s: float, threshold: float = NOISY) -> dict[str, float]:
    """Wait (up to max_s) for a second in which other processes use under ``threshold`` cores."""
    t0, cores = time.perf_counter(), float("nan")
    while True:
        others = Others(time.process_time)
        time.sleep(1.0)
        cores = others.cores()
        if cores < threshold or time.perf_counter() - t0 >= max_s:
            return {"waited_s": time.perf_counter() - t0, "others_cores": cores}


# -- the server ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for name in ("ASIF_API_KEY", "ASIF_RUNTIME", "ASIF_INDEX"):
        env.pop(name, None)
    return env


class Server:
    """``asif serve`` as a subprocess, its log in a file."""

    def __init__(self, index: Path, runtime: str, log: Path) -> None:
        self.port = free_port()
        self.log = log
        asif = Path(sys.executable).with_name("asif")
        cmd = [str(asif), "serve", "--index", str(index), "--port", str(self.port), "--runtime", runtime]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(
                [*cmd, "--log-level", "warning"],
                env=server_env(),
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started = time.perf_counter()

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from the start until GET /readyz answers 200."""
        while time.perf_counter() - self.started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"asif serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.5)
        raise RuntimeError(f"asif serve not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


METRIC = re.compile(r"^(asif_request_seconds|asif_encoder_batch_size)_(sum|count)\{([^}]*)\} (\S+)$")


def scrape(client: Client) -> dict[str, float]:
    """The route-latency and encoder-batch sums and counts of GET /metrics, keyed ``name_kind{labels}``."""
    status, body = client.send(("GET", "/metrics", None, None))
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if m := METRIC.match(line):
            out[f"{m[1]}_{m[2]}{{{m[3]}}}"] = float(m[4])
    return out


def metric_delta(before: dict[str, float], after: dict[str, float], name: str, label: str) -> tuple[float, float]:
    """(sum, count) of a histogram between two scrapes, for series whose labels contain ``label``."""
    parts = []
    for kind in ("sum", "count"):
        keys = [k for k in after if k.startswith(f"{name}_{kind}{{") and label in k]
        parts.append(sum(after[k] - before.get(k, 0.0) for k in keys))
    return parts[0], parts[1]
