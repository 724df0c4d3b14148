"""Live edits over HTTP: the first classification after an add or a delete, against idle (issue #27).

    python bench/live_http.py --indices f2k,demo,1m --label-sets 10,2000,10000 --json bench/live_http_results.json

For each index, ``asif serve`` runs as a subprocess (as in ``bench/e2e.py``) and, for each stored label set size in
turn (labels drawn from Flickr8k caption words, one template ``a photo of a {}.``; the set is PUT, measured, then
deleted):

``--rounds`` rounds of: a pause (``--settle``), ``--idle-per-round`` idle single-image ``POST /v1/classify`` against
the stored set; ``POST /v1/pairs`` (a real photo, a real caption), then at once a classification (and a second);
``DELETE /v1/pairs/{id}`` of that pair, then at once a classification. Reported: the add and delete latencies (they
include the label upkeep: an edit brings the stored sets up to date before it answers) and the first classification
after each, as a ratio to the idle p50 (target <= 1.3); idle and edits interleave, so that a slow or fast spell of
the machine falls on both alike.

Indices: ``f2k`` (the first 2,000 rows of Flickr8k, built into ``runs/f2k`` if missing), ``demo`` (Flickr8k,
40,450 pairs, ``runs/demo``), and synthetic sizes (``1m``): seeded synthetic anchors whose manifest names the real
encoders (``bench/e2e_inputs.py``'s ``ensure_synthetic``, cached under ``runs/e2e``). Classified photos: Imagenette val.
Each run edits a copy of the index folder (``--work``), so the indices stay as built.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asif.state.persist import MANIFEST, read_manifest
from bench.e2e import DATA, ROOT
from bench.e2e_client import JSON_TYPE, Client, Outcomes, classify
from bench.e2e_inputs import (
    IMAGE_SPEC,
    TEXT_SPEC,
    ensure_demo,
    ensure_synthetic,
    load_photos,
    parse_size,
    real_identities,
)
from bench.e2e_report import machine, md_table, write_results
from bench.e2e_server import Server, server_env, wait_for_quiet
from bench.measure import code_version, percentiles

TEMPLATE = "a photo of a {}."
TARGET = 1.3


def label_words(captions_csv: Path, n: int) -> list[str]:
    """n distinct labels: Flickr8k caption words in order of first use, then word pairs."""
    words: dict[str, None] = {}
    with open(captions_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            words.update(dict.fromkeys(re.findall(r"[a-z]+", row["caption"].lower())))
    out = list(words)
    pairs = (f"{a} {b}" for a in out[:200] for b in out[:200] if a != b)
    while len(out) < n:
        out.append(next(pairs))
    return out[:n]


def edit_material(captions_csv: Path, images: Path, n: int) -> list[tuple[bytes, str]]:
    """n (JPEG bytes, caption) pairs from the end of Flickr8k (not among the f2k pairs)."""
    with open(captions_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[::-5][:n]
    return [((images / row["image"]).read_bytes(), row["caption"]) for row in rows]


def ensure_f2k(folder: Path) -> dict[str, Any]:
    if (folder / MANIFEST).is_file():
        return {"built": False}
    folder.parent.mkdir(parents=True, exist_ok=True)
    pairs = folder.parent / "pairs2k.csv"
    with open(DATA / "flickr8k" / "captions.csv", newline="", encoding="utf-8") as fh:
        pairs.write_text("".join(line for _, line in zip(range(2001), fh, strict=False)))
    cmd = [str(Path(sys.executable).with_name("asif")), "build", "--pairs", str(pairs)]
    cmd += ["--images-root", str(DATA / "flickr8k" / "images"), "--out", str(folder)]
    cmd += ["--image-encoder", IMAGE_SPEC, "--text-encoder", TEXT_SPEC]
    subprocess.run(cmd, check=True, env=server_env())
    return {"built": True}


def index_for(name: str, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    if name == "f2k":
        return args.f2k_index, ensure_f2k(args.f2k_index)
    if name == "demo":
        return args.demo_index, ensure_demo(args.demo_index, DATA)
    size = parse_size(name)
    assert isinstance(size, int)
    return ensure_synthetic(args.cache, size, real_identities())


def working_copy(folder: Path, work: Path) -> Path:
    """A copy of the index folder to edit (large files hard-linked: edits write new files, never into these)."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(folder, work, copy_function=os.link, ignore=shutil.ignore_patterns(".build"))
    for db in work.glob("*.sqlite*"):  # SQLite is written in place: a real copy
        db.unlink()
        shutil.copy2(folder / db.name, db)
    return work


def send_ok(client: Client, req: tuple[str, str, bytes | None, str | None]) -> tuple[float, bytes]:
    start = time.perf_counter()
    status, body = client.send(req)
    elapsed = time.perf_counter() - start
    if status not in (200, 201):
        raise RuntimeError(f"{req[0]} {req[1]}: {status} {body[:300]!r}")
    return elapsed, body


def measure_set(
    client: Client, photos: list[bytes], material: list[tuple[bytes, str]], n_labels: int, args: argparse.Namespace
) -> dict[str, Any]:
    name = f"live-{n_labels}"
    body = json.dumps({"labels": label_words(DATA / "flickr8k" / "captions.csv", n_labels), "templates": [TEMPLATE]})
    put_s, _ = send_ok(client, ("PUT", f"/v1/label-sets/{name}", body.encode(), JSON_TYPE))
    fields = {"label_set": name}
    photo = iter(photos * 4)
    for _ in range(args.warmup):
        send_ok(client, classify([next(photo)], fields))
    idle, adds, deletes, after_add, after_delete, second = [], [], [], [], [], []
    for r in range(args.rounds):
        # Idle: classifications well after the last edit (its background work done), taken between the edit rounds
        # so that a slow or fast spell of the machine falls on both sides alike.
        time.sleep(args.settle)
        idle += [send_ok(client, classify([next(photo)], fields))[0] for _ in range(args.idle_per_round)]
        blob, caption = material[r % len(material)]
        b64 = base64.b64encode(blob).decode()
        pair = json.dumps({"pairs": [{"image": b64, "caption": caption}]}).encode()
        t, out = send_ok(client, ("POST", "/v1/pairs", pair, JSON_TYPE))
        adds.append(t)
        after_add.append(send_ok(client, classify([next(photo)], fields))[0])
        second.append(send_ok(client, classify([next(photo)], fields))[0])
        pair_id = json.loads(out)["ids"][0]
        deletes.append(send_ok(client, ("DELETE", f"/v1/pairs/{pair_id}", None, None))[0])
        after_delete.append(send_ok(client, classify([next(photo)], fields))[0])
    send_ok(client, ("DELETE", f"/v1/label-sets/{name}", None, None))
    idle_p50 = float(np.median(idle))
    return {
        "labels": n_labels,
        "put_s": put_s,
        "idle": percentiles(idle),
        "add": percentiles(adds),
        "delete": percentiles(deletes),
        "first_after_add": percentiles(after_add),
        "second_after_add": percentiles(second),
        "first_after_delete": percentiles(after_delete),
        "ratio_add_p50": float(np.median(after_add)) / idle_p50,
        "ratio_delete_p50": float(np.median(after_delete)) / idle_p50,
        "ratio_add_p90": float(np.percentile(after_add, 90)) / idle_p50,
        "ratio_delete_p90": float(np.percentile(after_delete, 90)) / idle_p50,
    }


def run_index(name: str, args: argparse.Namespace, photos: list[bytes], material: list[tuple[bytes, str]]) -> dict:
    folder, prep = index_for(name, args)
    work = working_copy(folder, args.work / name)
    server = Server(work, "auto", args.cache / "logs" / f"live-http-{name}.log")
    try:
        ready = server.wait_ready(args.ready_timeout)
        print(f"{name}: ready in {ready:.1f} s", flush=True)
        client = Client(server.port, Outcomes())
        sets = []
        for n_labels in args.label_sets:
            quiet = wait_for_quiet(args.quiet_wait)
            result = measure_set(client, photos, material, n_labels, args)
            result["others_cores_before"] = quiet["others_cores"]
            sets.append(result)
            print(
                f"  {n_labels} labels: idle p50 {result['idle']['p50_ms']:.1f} ms, first after add x"
                f"{result['ratio_add_p50']:.2f}, after delete x{result['ratio_delete_p50']:.2f}, add p99 "
                f"{result['add']['p99_ms']:.0f} ms, delete p99 {result['delete']['p99_ms']:.0f} ms",
                flush=True,
            )
        metrics = client.send(("GET", "/metrics", None, None))[1].decode()
        client.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    pairs = int(read_manifest(folder).get("counts", {}).get("pairs", 0))
    return {
        "index": name,
        "pairs": pairs,
        "ready_s": ready,
        "index_prep": prep,
        "label_sets": sets,
        "read_lock": read_lock_holds(metrics),
    }


def read_lock_holds(metrics: str) -> dict[str, float]:
    """The server's read-lock holds over the whole run (every PUT, edit and classification): the longest, and how
    many lasted over 100 ms (``asif_read_lock_*`` of /metrics)."""
    values = {}
    for line in metrics.splitlines():
        if m := re.match(
            r'^asif_read_lock_(hold_seconds_bucket\{le="([^"]+)"\}|hold_seconds_count|longest_hold_seconds) (\S+)$',
            line,
        ):
            values[m[2] or m[1]] = float(m[3])
    total = values.get("hold_seconds_count", 0.0)
    return {
        "holds": total,
        "over_100ms": total - values.get("0.1", total),
        "longest_s": values.get("longest_hold_seconds", 0.0),
    }


def report(runs: Sequence[dict[str, Any]]) -> str:
    rows = []
    for run in runs:
        for s in run["label_sets"]:
            ok = max(s["ratio_add_p50"], s["ratio_delete_p50"]) <= TARGET
            rows.append(
                [
                    f"{run['index']} ({run['pairs']:,})",
                    f"{s['labels']:,}",
                    f"{s['idle']['p50_ms']:.1f}",
                    f"{s['first_after_add']['p50_ms']:.1f} (x{s['ratio_add_p50']:.2f})",
                    f"{s['first_after_delete']['p50_ms']:.1f} (x{s['ratio_delete_p50']:.2f})",
                    f"x{s['ratio_add_p90']:.2f} / x{s['ratio_delete_p90']:.2f}",
                    f"{s['add']['p50_ms']:.0f} / {s['add']['p99_ms']:.0f}",
                    f"{s['delete']['p50_ms']:.0f} / {s['delete']['p99_ms']:.0f}",
                    "pass" if ok else "FAIL",
                ]
            )
    holds = [
        f"{run['index']}: longest read-lock hold {run['read_lock']['longest_s'] * 1000:.0f} ms, "
        f"{run['read_lock']['over_100ms']:.0f} of {run['read_lock']['holds']:.0f} holds over 100 ms"
        for run in runs
    ]
    header = [
        "index (pairs)",
        "stored labels",
        "idle classify p50 ms",
        "first after add p50 ms",
        "first after delete p50 ms",
        "p90 ratios (add / delete)",
        "add p50 / p99 ms",
        "delete p50 / p99 ms",
        f"<= {TARGET}x",
    ]
    return md_table(header, rows) + "\n\n" + "\n".join(holds)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--indices", default="f2k,demo,1m", help="comma-separated: f2k, demo, 1m, 100k, ...")
    ap.add_argument("--label-sets", default="10,2000,10000", help="stored label set sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=20, help="add + delete rounds per label set")
    ap.add_argument("--idle-per-round", type=int, default=3, help="idle classifications before each round")
    ap.add_argument("--settle", type=float, default=0.3, help="seconds between a round's last edit and idle")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--quiet-wait", type=float, default=30.0)
    ap.add_argument("--ready-timeout", type=float, default=1800.0)
    ap.add_argument("--f2k-index", type=Path, default=ROOT / "runs" / "f2k")
    ap.add_argument("--demo-index", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "e2e")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "live-http")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "live_http_results.json")
    args = ap.parse_args(argv)
    args.indices = [s.strip() for s in args.indices.split(",") if s.strip()]
    args.label_sets = [int(s) for s in args.label_sets.split(",") if s.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    t0 = time.perf_counter()
    photos = load_photos(DATA / "imagenette" / "val", args.seed)[
        : args.warmup + (args.idle_per_round + 3) * args.rounds
    ]
    material = edit_material(DATA / "flickr8k" / "captions.csv", DATA / "flickr8k" / "images", args.rounds)
    runs = [run_index(name, args, photos, material) for name in args.indices]
    results = {
        "machine": machine(),
        "code": code_version(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "target": TARGET,
        "runs": runs,
        "wall_s": time.perf_counter() - t0,
    }
    write_results(args.json, results, report(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
