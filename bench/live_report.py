"""The live-traffic bench's printed report: markdown tables of a run's results (bench/live_traffic.py's JSON)."""

from __future__ import annotations

from typing import Any

from bench.live_phases import QUICK_EDITS, SMALL_EDITS
from bench.synthetic_index import N_CLASSES, K, P


def _pp(d: dict[str, float]) -> str:
    return f"{d['p50_ms']:.2f} / {d['p99_ms']:.2f}"


def gc_cell(gcs: dict[str, dict[str, float]], pooled: bool) -> str:
    g = gcs["gen2"]
    return f"{g['collections']} ({g['max_ms']:.0f})" + (" a-c" if pooled else "")


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        f"Classify, one image, k={K}, p={P:g}, {results[0]['label_sets']} label sets x {N_CLASSES} classes "
        "registered: p50 / p99 ms (samples)",
        "",
        "| n | index (image / text) | idle | under edits (edits/s) | edits + snapshots (snapshots) | "
        "during compaction | p99 ratio edits / snapshots / compaction | compaction s (delta files folded) |",
        "|" + "---|" * 8,
    ]
    for r in results:
        c = r["classify"]
        ratio = r["p99_ratio_vs_idle"]
        rows.append(
            f"| {r['n']:,} | {r['index']['image']} / {r['index']['text']} | "
            f"{_pp(c['idle']['latency'])} ({c['idle']['latency']['n']}) | "
            f"{_pp(c['edits']['latency'])} ({c['edits']['edit_stream']['rate_per_s']:.1f}/s) | "
            f"{_pp(c['snapshots']['latency'])} ({c['snapshots']['snapshot_loop']['snapshots']}) | "
            f"{_pp(c['compaction']['latency'])} ({c['compaction']['latency']['n']}) | "
            f"{ratio['edits']:.2f}x / {ratio['snapshots']:.2f}x / {ratio['compaction']:.2f}x | "
            + ", ".join(
                f"{s:.1f} ({d})"
                for s, d in zip(c["compaction"]["compaction_s"], c["compaction"]["delta_files_folded"], strict=True)
            )
            + " |"
        )
    rows += [
        "",
        "Where the p99 goes (ms): read-lock wait p99; latency minus lock wait p50 / p99; the classify thread's CPU "
        "time p50 / p99; time off CPU other than the lock wait (GIL, label-set lock, no free core) p50 / p99; share "
        "of requests an edit overlapped (their p99 / the others' p99); full (generation-2) garbage collections in "
        "the phase, any thread (max ms; for phases a-c, the three together)",
        "",
        "| n | phase | lock wait p99 | minus lock wait | thread CPU | off CPU | overlapped by an edit | gen-2 GCs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, ph in r["classify"].items():
            ov = ph.get("overlapped_by_edit")
            ov_s = (
                f"{100 * ov['fraction']:.0f}% ({ov['overlapped']['p99_ms']:.2f} / {ov['clear']['p99_ms']:.2f})"
                if ov
                else "-"
            )
            rows.append(
                f"| {r['n']:,} | {name} | {ph['read_lock_wait']['p99_ms']:.2f} | "
                f"{_pp(ph['latency_minus_lock_wait'])} | {_pp(ph['thread_cpu'])} | "
                f"{_pp(ph['off_cpu_minus_lock_wait'])} | {ov_s} | "
                f"{gc_cell(ph.get('gc') or r['during_phases_a_to_c']['gc'], 'gc' not in ph)} |"
            )
    rows += [
        "",
        "Snapshot cost (delta file) vs a full compaction (new base generation), quiet: s, bytes written",
        "",
        f"| n | snapshot after {QUICK_EDITS:,} edits | snapshot after {SMALL_EDITS} edits | full compaction | "
        "base files |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        s = r["snapshot_cost"]
        big, small, full = s[f"after_{QUICK_EDITS}_edits"], s[f"after_{SMALL_EDITS}_edits"], s["full_compaction"]
        rows.append(
            f"| {r['n']:,} | {1000 * big['s']:.1f} ms, {big['delta_bytes'] / 1e6:.2f} MB | "
            f"{1000 * small['s']:.1f} ms, {small['delta_bytes'] / 1e6:.2f} MB | "
            f"{full['s']:.1f} s, {full['bytes'] / 1e6:.0f} MB | {r['base_bytes'] / 1e6:.0f} MB |"
        )
    rows += [
        "",
        "Edits (quiet, one pair each) and the classify right after each edit: p50 / p99 ms",
        "",
        "| n | add | delete | first add after open (ms) | first classify after edit | second classify after edit | "
        "steady (idle) | add / delete p50 ms under traffic (phase b) | background jobs per edit (mean ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e, a = r["edit_latency"], r["after_edit"]
        es, rb = r["classify"]["edits"]["edit_stream"], r["background_jobs_during_quiet_edits"]
        rows.append(
            f"| {r['n']:,} | {_pp(e['add'])} | {_pp(e['delete'])} | {e['first_add_after_open_ms']:.0f} | "
            f"{_pp(a['first']['latency'])} | "
            f"{_pp(a['second']['latency'])} | {_pp(r['classify']['idle']['latency'])} | "
            f"{es['add']['p50_ms']:.1f} / {es['delete']['p50_ms']:.1f} | "
            f"{rb['jobs'] / QUICK_EDITS:.1f} ({rb['mean_ms']:.1f}) |"
        )
    rows += [
        "",
        "| n | index written s | open s | label sets registered s | RSS loaded MB | peak RSS MB | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['n']:,} | {r['timings']['total_s']:.0f} | {r['open_s']:.1f} | {r['register_label_sets_s']:.1f} | "
            f"{r['rss_mb_loaded']:.0f} | {r['peak_rss_mb']:.0f} | {r.get('wall_s', float('nan')):.0f} |"
        )
    return "\n".join(rows)
