"""The end-to-end bench's report (``bench/e2e.py``): the ratios against the targets of the issue, the markdown tables
of the server figures, the floor and the ratios (contended figures flagged), the machine, and the results file."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.e2e_server import NOISY

TARGETS: list[tuple[str, str, str, float]] = [  # name, description, "<=" or ">=", target
    ("single_p50_vs_floor_b1", "1-image p50 / floor b1 (decode+prep+net)", "<=", 2.0),
    ("single_p50_vs_net_b1", "1-image p50 / floor b1 (network alone)", "<=", 2.0),
    ("single_p99_vs_p50", "1-image p99 / p50", "<=", 2.0),
    ("batch32_vs_floor_b32", "32-image ms/img / floor b32 (decode+prep+net)", "<=", 1.3),
    ("batch32_vs_net_b32", "32-image ms/img / floor b32 (network alone)", "<=", 1.3),
    ("concurrent_vs_floor_b32", "concurrent img/s / floor b32 img/s (decode+prep+net)", ">=", 0.6),
    ("concurrent_vs_net_b32", "concurrent img/s / floor b32 img/s (network alone)", ">=", 0.6),
]


# -- the report ----------------------------------------------------------------------------------------------
def ratios(run: dict[str, Any], fl: dict[str, Any]) -> dict[str, float]:
    single = run["classify_stored"]["latency"]
    return {
        "single_p50_vs_floor_b1": single["p50_ms"] / fl["full_b1"]["p50_ms"],
        "single_p50_vs_net_b1": single["p50_ms"] / fl["net_b1"]["p50_ms"],
        "single_p99_vs_p50": single["p99_ms"] / single["p50_ms"],
        "batch32_vs_floor_b32": run["classify_32"]["ms_per_image"] / fl["full_b32_ms_per_image"],
        "batch32_vs_net_b32": run["classify_32"]["ms_per_image"] / fl["net_b32_ms_per_image"],
        "concurrent_vs_floor_b32": run["concurrent"]["images_per_s"] / fl["full_b32_images_per_s"],
        "concurrent_vs_net_b32": run["concurrent"]["images_per_s"] / fl["net_b32_images_per_s"],
    }


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pp(d: dict[str, float]) -> str:
    return f"{d['p50_ms']:.1f} / {d['p99_ms']:.1f}"


SERVER_ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("server ready (s)", lambda r: _f(r["ready_s"])),
    ("label set PUT (ms)", lambda r: _f(r["label_set_put_ms"])),
    ("1 image, stored labels: p50 / p99 (ms)", lambda r: _pp(r["classify_stored"]["latency"])),
    ("  server's own mean (ms)", lambda r: _f(r["classify_stored"]["server_mean_ms"])),
    ("  server CPU / client CPU per image (ms)", lambda r: _cpu(r["classify_stored"])),
    ("32 images: ms/img (p50 request / 32)", lambda r: _f(r["classify_32"]["ms_per_image"])),
    ("  server CPU per image (ms)", lambda r: _f(r["classify_32"]["server_cpu_ms_per_image"])),
    ("concurrent clients: img/s", lambda r: _f(r["concurrent"]["images_per_s"])),
    ("  latency p50 / p99 (ms)", lambda r: _pp(r["concurrent"]["latency"])),
    ("  mean encoder batch", lambda r: _f(r["concurrent"]["encoder_mean_batch"])),
    ("  server CPU per image (ms), cores busy", lambda r: _cores(r["concurrent"])),
    ("search (text): p50 / p99 (ms)", lambda r: _pp(r["search"]["latency"])),
    ("inline 10 labels, first call (ms)", lambda r: _f(r["inline_first_ms"])),
    ("inline 10 labels, warm: p50 / p99 (ms)", lambda r: _pp(r["classify_inline"]["latency"])),
    ("other processes' CPU, worst phase (cores)", lambda r: _f(max_others(r), 2)),
    ("non-200 responses", lambda r: str(sum(v for k, v in r["status_codes"].items() if k != "200"))),
]


PHASES = ("classify_stored", "classify_inline", "classify_32", "concurrent", "search")


def max_others(run: dict[str, Any]) -> float:
    return max(run[phase]["others_cores"] for phase in PHASES)


def _cpu(phase: dict[str, Any]) -> str:
    return f"{phase['server_cpu_ms_per_image']:.1f} / {phase['client_cpu_ms_per_image']:.2f}"


def _cores(phase: dict[str, Any]) -> str:
    return f"{phase['server_cpu_ms_per_image']:.1f}, {phase['server_cpu_cores']:.2f}"


FLOOR_ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("decode + prepare, 1 image: p50 (ms)", lambda f: _f(f["decode_prepare"]["p50_ms"], 2)),
    ("network, batch 1: p50 / p99 (ms)", lambda f: _pp(f["net_b1"])),
    ("decode + prepare + network, batch 1: p50 / p99 (ms)", lambda f: _pp(f["full_b1"])),
    ("network, batch 32: ms/img, img/s", lambda f: f"{f['net_b32_ms_per_image']:.2f}, {f['net_b32_images_per_s']:.0f}"),
    ("decode + prepare + network, batch 32: ms/img, img/s", lambda f: _b32(f)),
    ("text encoder, batch 1: p50 (ms)", lambda f: _f(f["text_b1"]["p50_ms"], 2)),
    ("other processes' CPU (cores)", lambda f: _f(f["others_cores"], 2)),
]


def _b32(f: dict[str, Any]) -> str:
    return f"{f['full_b32_ms_per_image']:.2f}, {f['full_b32_images_per_s']:.0f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def report(results: dict[str, Any]) -> str:
    runs, fl = results["runs"], results["floor"]
    cols = [f"{r['size']} ({r['pairs']:,} pairs) / {r['runtime']}" for r in runs]
    server = md_table(["figure", *cols], [[name, *(fn(r) for r in runs)] for name, fn in SERVER_ROWS])
    floor_t = md_table(
        ["floor (in process, no server)", *fl], [[n, *(fn(f) for f in fl.values())] for n, fn in FLOOR_ROWS]
    )
    rows = []
    for key, desc, op, target in TARGETS:
        cells = []
        for r in runs:
            v = r["ratios"][key]
            ok = v <= target if op == "<=" else v >= target
            cells.append(f"{v:.2f} {'pass' if ok else 'FAIL'}")
        rows.append([desc, f"{op} {target}", *cells])
    ratio_t = md_table(["ratio (floor of the server's runtime)", "target", *cols], rows)
    noisy = [f"floor/{k}" for k, f in fl.items() if f["others_cores"] > NOISY] + [
        f"{r['size']}/{r['runtime']}" for r in runs if max_others(r) > NOISY
    ]
    warning = f"WARNING: other processes used over {NOISY} cores during: {', '.join(noisy)}" if noisy else ""
    return "\n\n".join(x for x in (server, floor_t, ratio_t, warning) if x)


def machine() -> dict[str, Any]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return {
        "cpu_count": os.cpu_count(),
        "cpu": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def write_results(path: Path, results: dict[str, Any], table: str) -> None:
    """A bench's results as JSON, and its table on stdout."""
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table)
    print(f"\nwrote {path} ({results['wall_s']:.0f} s)")
