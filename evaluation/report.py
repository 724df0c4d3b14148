"""Markdown tables and PNG plots of an evaluation report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from asif.math.relrep import PARAM_NAMES


def test_name(report: dict[str, Any]) -> str:
    """The test set's last two path parts, e.g. 'imagenette/val'."""
    return "/".join(Path(report["test_set"]).parts[-2:])


MAX_PLOT_CLASSES = 40  # classes drawn in confusion.png: above, the most confused ones, the rest summed as "other"
MAX_CELL_TEXT_CLASSES = 40  # counts are written in the cells up to this many classes


def confusion_view(
    conf: np.ndarray, names: list[str], limit: int = MAX_PLOT_CLASSES
) -> tuple[int, np.ndarray, list[str]]:
    """The classes to draw: all of them up to ``limit``, else the ``limit`` with the most misclassified test images,
    with every prediction of another class summed into an "other" column. Returns (classes drawn, matrix, names)."""
    n = len(names)
    if n <= limit:
        return n, conf, list(names)
    wrong = conf[:, :n].sum(axis=1) - np.diag(conf[:, :n])  # misclassified images per true class
    keep = np.sort(np.argsort(-wrong, kind="stable")[:limit])
    other = conf[keep][:, :n].sum(axis=1) - conf[keep][:, keep].sum(axis=1)
    view = np.concatenate([conf[keep][:, keep], other[:, None], conf[keep][:, n:]], axis=1)
    return limit, view, [names[i] for i in keep]


def top_confusions(conf: np.ndarray, names: list[str], top: int = 20) -> list[tuple[str, str, int, float]]:
    """The largest off-diagonal cells: (true class, predicted class or 'unknown', images, share of the true class)."""
    conf = np.asarray(conf)
    n = len(names)
    off = conf.astype(np.int64).copy()
    off[np.arange(n), np.arange(n)] = 0
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    totals = conf.sum(axis=1)
    out = []
    for flat in order:
        i, j = divmod(int(flat), off.shape[1])
        if off[i, j] == 0:
            break
        out.append((names[i], names[j] if j < n else "unknown", int(off[i, j]), float(off[i, j] / max(totals[i], 1))))
    return out


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
    shown, conf, names = confusion_view(conf, report["classes"])
    rows = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    side = min(1.0 + 0.5 * len(names), 16.0)  # inches: bounded whatever the number of classes
    fig, ax = plt.subplots(figsize=(side + 0.05 * side, side))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    font = 8 if len(names) <= 30 else 6
    ax.set_xticks(range(conf.shape[1]), [*names, *(["other"] if shown < len(report["classes"]) else []), "unknown"],
                  rotation=60, ha="right", fontsize=font)  # fmt: skip
    ax.set_yticks(range(len(names)), names, fontsize=font)
    if len(names) <= MAX_CELL_TEXT_CLASSES:
        for i, j in zip(*np.nonzero(conf), strict=True):
            colour = "white" if rows[i, j] > 0.5 else "black"
            ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=6, color=colour)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    n_all = len(report["classes"])
    subset = f", the {shown} most confused of {n_all} classes" if shown < n_all else ""
    ax.set_title(f"{test_name(report)}: confusion (k={report['k']}, p={report['p']:g}{subset})")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=120)
    plt.close(fig)
    return True


def auto_weighting(auto: dict) -> str:
    """An --auto choice as 'p=8' or 'softmax t=0.1' (reports written before the weighting was chosen: p)."""
    w = auto.get("weighting") or {"kind": "power", "param": auto["p"]}
    name = PARAM_NAMES[w["kind"]]
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
            f"`--auto` (held-out images' mrr of their own captions, no test labels) picked k={a['k']}, "
            f"{auto_weighting(a)}: top-1 {_pct(a['test_top1_at_auto'])}, against {_pct(a['best_test_top1'])} for the "
            f"best setting of its grid on the test set ({a['best_test_setting']})."
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
    confusions = top_confusions(np.asarray(report["confusion"]), report["classes"])
    if confusions:
        lines += ["", "Top confusions (dense reference):", "", "| true | predicted | images | share of the class |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {t} | {p} | {c} | {_pct(share)}% |" for t, p, c, share in confusions]
    per_class = sorted(m["per_class"].items(), key=lambda kv: kv[1])
    if len(per_class) > 2 * MAX_PLOT_CLASSES:  # many classes: the worst and the best only
        worst = ", ".join(f"{c} {_pct(v)}" for c, v in per_class[:MAX_PLOT_CLASSES])
        best = ", ".join(f"{c} {_pct(v)}" for c, v in per_class[-MAX_PLOT_CLASSES:])
        head = f"Per-class top-1 (the {MAX_PLOT_CLASSES} worst and best of {len(per_class)}; all in report.json)"
        lines += ["", f"{head}: {worst} ... {best}", ""]
    else:
        lines += ["", "Per-class top-1: " + ", ".join(f"{c} {_pct(v)}" for c, v in m["per_class"].items()), ""]
    return "\n".join(lines)


def write_markdown(report: dict[str, Any], out: Path) -> None:
    (out / "report.md").write_text(markdown(report) + "\n", encoding="utf-8")
