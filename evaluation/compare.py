"""Side-by-side table of the candidates of several `asif eval --candidates` reports (the table of docs/evaluation.md).

    python -m evaluation.compare docs/eval/candidates_lite0_*        # Markdown on stdout

Columns are the reports (named by text encoder and test set), rows the candidates: top-1 in % at each candidate's
label-free parameter, the difference with the default in brackets; then the ridge baseline and the `--auto` choice.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evaluation.report import auto_weighting


def _column(report: dict) -> str:
    text = report["encoders"]["text"].get("spec") or report["encoders"]["text"].get("name", "?")
    path = Path(report["test_set"])
    test = path.parent.name if path.name in ("val", "test") else path.name
    return f"{test} {text}"


def _auto(report: dict) -> str:
    a = report.get("auto")
    if not a:
        return ""
    return f"{100 * a['test_top1_at_auto']:.1f} (k={a['k']}, {auto_weighting(a)})"


def table(reports: list[dict]) -> str:
    names: list[str] = []
    for r in reports:
        names += [n for n in r.get("candidates", {}) if n not in names]
    lines = ["| candidate | " + " | ".join(_column(r) for r in reports) + " |", "|---" * (len(reports) + 1) + "|"]
    for name in names:
        cells = []
        for r in reports:
            c = r.get("candidates", {}).get(name)
            base = r["candidates"]["default"]["top1"] if "default" in r.get("candidates", {}) else None
            if c is None or "skipped" in c:
                cells.append("")
                continue
            delta = f" ({100 * (c['top1'] - base):+.1f})" if base is not None and name != "default" else ""
            param = f" [{c['parameter']}]" if c.get("parameter") else ""
            cells.append(f"{100 * c['top1']:.1f}{delta}{param}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| ridge baseline (trained) | " + " | ".join(
        f"{100 * r['ridge_baseline']['metrics']['top1']:.1f}" for r in reports) + " |")  # fmt: skip
    lines.append("| `--auto` (k and weighting) | " + " | ".join(_auto(r) for r in reports) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders holding report.json")
    args = parser.parse_args(argv)
    print(table([json.loads((f / "report.json").read_text()) for f in args.folders]))


if __name__ == "__main__":
    main()
