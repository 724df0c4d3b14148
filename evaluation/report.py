"""Markdown tables and PNG plots of an evaluation report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def test_name(report: dict[str, Any]) -> str:
    """The test set's last two path parts, e.g. 'imagenette/val'."""
    return "/".join(Path(report["test_set"]).parts[-2:])


def write_plots(report: dict[str, Any], out: Path) -> bool:
    """accuracy_vs_pairs.png and confusion.png; False (and nothing written) without matplotlib, which the
    serve image leaves out: ``pip install "asif[eval]"`` adds it."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["accuracy_vs_pairs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curve["curves"].items():
        ax.plot(curve["sizes"], values, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("pairs used as anchors (nested random subsets)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(f"{test_name(report)}: accuracy vs pairs ({report['n_pairs']} '{report['anchors']}' anchors)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_pairs.png", dpi=120)
    plt.close(fig)

    conf = np.asarray(report["confusion"], dtype=float)
    rows = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    names = report["classes"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(names), 1.0 + 0.5 * len(names)))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names) + 1), [*names, "unknown"], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            if conf[i, j]:
                ax.text(
                    j,
                    i,
                    int(conf[i, j]),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if rows[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{test_name(report)}: confusion (k={report['k']}, p={report['p']:g})")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=120)
    plt.close(fig)
    return True


def _weighting(auto: dict) -> str:
    """An --auto choice as 'p=8' or 'softmax t=0.1' (reports written before the weighting was chosen: p)."""
    w = auto.get("weighting") or {"kind": "power", "param": auto["p"]}
    name = {"power": "p", "softmax": "t", "rank": "r0"}[w["kind"]]
    return f"{name}={w['param']:g}" if w["kind"] == "power" else f"{w['kind']} {name}={w['param']:g}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(report: dict[str, Any]) -> str:
    m = report["metrics"]
    lines = [
        f"### {test_name(report)}: {report['n_test']} test images, {len(report['classes'])} classes, "
        f"{report['n_pairs']} anchors ('{report['anchors']}'), "
        f"{report['encoders']['image']['name']} + {report['encoders']['text']['name']}",
        "",
        "| method | top-1 | top-5 |",
        "|---|---|---|",
        f"| ASIF dense reference (k={report['k']}, p={report['p']:g}) | {_pct(m['top1'])} | {_pct(m['top5'])} |",
        f"| ASIF served path ({report['served']['index']['image']['factory']}) | {_pct(report['served']['top1'])} | |",
        f"| ridge baseline (lambda={report['ridge_baseline']['lambda']:g}) | "
        f"{_pct(report['ridge_baseline']['metrics']['top1'])} | {_pct(report['ridge_baseline']['metrics']['top5'])} |",
        "",
        f"Served vs dense: top-1 agreement {_pct(report['served']['top1_agreement'])}%, accuracy difference "
        f"{report['served']['accuracy_difference_points']:+.2f} points."
        + (
            f" Image-index recall@k against exact search: {report['served']['image_recall_at_k']:.3f}."
            if report["served"].get("image_recall_at_k") is not None
            else ""
        )
        + (f" Unknown answers: {_pct(m['unknown_share'])}%." if m["unknown_share"] else ""),
        "",
    ]
    if len(report["anchor_modes"]) > 1:
        lines += ["| anchors | pairs | top-1 | top-5 |", "|---|---|---|---|"]
        for mode, r in report["anchor_modes"].items():
            desc = "one per image, mean caption embedding" if mode == "image" else "one per caption"
            lines.append(
                f"| {mode} ({desc}) | {r['n_pairs']} | {_pct(r['metrics']['top1'])} | {_pct(r['metrics']['top5'])} |"
            )
        lines.append("")
    sweep = report["anchor_modes"][report["anchors"]]["sweep_top1"]
    ks = sorted({int(key.split(",")[0]) for key in sweep})
    ps = sorted({float(key.split(",")[1]) for key in sweep})
    lines += ["Top-1 by k (rows) and p (columns):", "", "| k \\ p | " + " | ".join(f"{p:g}" for p in ps) + " |"]
    lines.append("|---" * (len(ps) + 1) + "|")
    for k in ks:
        lines.append(f"| {k} | " + " | ".join(_pct(sweep[f"{k},{p:g}"]) for p in ps) + " |")
    lines.append("")
    if "auto" in report:
        a = report["auto"]
        lines.append(
            f"`--auto` (held-out pair retrieval, no test labels) picked k={a['k']}, {_weighting(a)}: top-1 "
            f"{_pct(a['test_top1_at_auto'])}, against {_pct(a['best_test_top1'])} for the best power setting on the "
            f"test set (k,p = {a['best_test_setting']})."
        )
        lines.append("")
    if report.get("candidates"):
        ridge = report["ridge_baseline"]["metrics"]["top1"]
        lines += [
            f"Training-free variants at k={report['k']}, p={report['p']:g} (parameters chosen by held-out pair "
            f"retrieval, no test labels; ridge baseline {_pct(ridge)}):",
            "",
            "| candidate | what | chosen parameter | top-1 | top-1 at each parameter |",
            "|---|---|---|---|---|",
        ]
        for name, c in report["candidates"].items():
            if "skipped" in c:
                lines.append(f"| {name} | {c['what']} | | skipped: {c['skipped']} | |")
                continue
            grid = ", ".join(f"{v}: {_pct(t)}" for v, t in (c["top1_per_parameter"] or {}).items())
            lines.append(f"| {name} | {c['what']} | {c['parameter'] or ''} | {_pct(c['top1'])} | {grid} |")
        lines.append("")
    curve = report["accuracy_vs_pairs"]
    lines += ["Accuracy vs pairs:", "", "| setting | " + " | ".join(str(s) for s in curve["sizes"]) + " |"]
    lines.append("|---" * (len(curve["sizes"]) + 1) + "|")
    for name, vals in curve["curves"].items():
        lines.append(f"| {name} | " + " | ".join(_pct(v) for v in vals) + " |")
    lines += ["", "Per-class top-1: " + ", ".join(f"{c} {_pct(v)}" for c, v in m["per_class"].items()), ""]
    return "\n".join(lines)


def write_markdown(report: dict[str, Any], out: Path) -> None:
    (out / "report.md").write_text(markdown(report) + "\n", encoding="utf-8")
