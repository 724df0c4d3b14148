#!/usr/bin/env python3
"""HTTP checks of a running ASIF container, for docker/smoke.sh. Standard library only (runs on the host).

    smoke_checks.py make-data SHARED_DATA OUT [--images N]    a small Flickr8k subset: OUT/pairs.csv, OUT/images/,
                                                              OUT/held_out.json (an image left out, to add live)
    smoke_checks.py wait-ready URL [--timeout S]
    smoke_checks.py edit URL DATA STATE                       classify, add the held-out pair, delete another
    smoke_checks.py verify URL DATA STATE [--no-pending]      after a restart: the edits are still there

Every check prints one line; the first that fails exits non-zero with what it saw.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

MARKER = "a smoke test caption that no flickr8k photo has"


class CheckFailed(Exception):
    pass


def ok(message: str) -> None:
    print(f"  ok: {message}", flush=True)


def call(url: str, method: str = "GET", body: Any = None, timeout: float = 60) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get("ASIF_API_KEY"):  # the write key smoke.sh read from the api container
        headers["Authorization"] = f"Bearer {os.environ['ASIF_API_KEY']}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def expect(url: str, status: int, method: str = "GET", body: Any = None) -> Any:
    got, answer = call(url, method, body)
    if got != status:
        raise CheckFailed(f"{method} {url}: HTTP {got}, expected {status}: {str(answer)[:500]}")
    return answer


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


# -- data ------------------------------------------------------------------------------------------------
def make_data(shared: Path, out: Path, n_images: int) -> None:
    """The first n_images Flickr8k photos (by name) with their captions, and the next one held out."""
    by_image: dict[str, list[str]] = {}
    with open(shared / "flickr8k" / "captions.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            by_image.setdefault(row["image"], []).append(row["caption"].strip())
    names = sorted(by_image)[: n_images + 1]
    kept, held = names[:n_images], names[n_images]
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(shared / "flickr8k" / "images" / name, out / "images" / name)
    with open(out / "pairs.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for name in kept:
            for caption in by_image[name]:
                writer.writerow([name, caption])
    (out / "held_out.json").write_text(json.dumps({"image": held, "captions": by_image[held]}))
    (out / "subset.json").write_text(json.dumps({name: by_image[name] for name in kept}))
    print(f"{len(kept)} images, {sum(len(by_image[n]) for n in kept)} pairs; held out {held}")


# -- checks ----------------------------------------------------------------------------------------------
def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            status, last = call(f"{url}/readyz", timeout=5)
            if status == 200:
                ok(f"/readyz answers 200 ({last})")
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last = exc
        time.sleep(1)
    raise CheckFailed(f"/readyz not ready after {timeout:.0f} s: {last}")


def classify(url: str, image: Path, labels: list[str], explain: int = 50) -> dict[str, Any]:
    body = {"images": [b64(image)], "labels": labels, "templates": ["{}"], "explain": explain, "top": len(labels)}
    return expect(f"{url}/v1/classify", 200, "POST", body)["results"][0]


def explained_ids(result: dict[str, Any]) -> list[int]:
    return [c["pair_id"] for c in result["explanation"]]


def edit(url: str, data: Path, state_path: Path) -> None:
    subset: dict[str, list[str]] = json.loads((data / "subset.json").read_text())
    held = json.loads((data / "held_out.json").read_text())
    names = sorted(subset)
    pairs_before = expect(f"{url}/v1/info", 200)["pairs"]

    # A real photo of the index, against its own caption and four other photos' captions.
    query = names[len(names) // 2]
    others = [subset[n][0] for n in names[:4]]
    labels = [subset[query][0], *others]
    result = classify(url, data / "images" / query, labels)
    if result["label"] != subset[query][0]:
        raise CheckFailed(f"{query} classified as {result['label']!r}, expected {subset[query][0]!r}: {result}")
    ok(f"{query} classified as its own caption among {len(labels)} ({result['scores'][0]['score']:.3f})")

    # Add the held-out photo with a caption no other pair has: it must explain its own classification.
    body = {"pairs": [{"image": b64(data / "images" / held["image"]), "caption": MARKER, "image_ref": held["image"]}]}
    added = expect(f"{url}/v1/pairs", 201, "POST", body)["ids"]
    if len(added) != 1:
        raise CheckFailed(f"one pair added, got ids {added}")
    result = classify(url, data / "images" / held["image"], [MARKER, *others])
    if result["label"] != MARKER or added[0] not in explained_ids(result)[:3]:
        raise CheckFailed(f"added pair {added[0]} not among the top explanations: {result}")
    ok(f"added pair {added[0]} explains the held-out photo's classification")

    # Delete the pair that explains the query photo most: it must disappear from its explanations.
    before = explained_ids(classify(url, data / "images" / query, labels))
    victim = before[0]
    expect(f"{url}/v1/pairs/{victim}", 200, "DELETE")
    after = explained_ids(classify(url, data / "images" / query, labels))
    if victim in after:
        raise CheckFailed(f"deleted pair {victim} still explains {query}: {after}")
    expect(f"{url}/v1/pairs/{victim}", 404)
    pairs_after = expect(f"{url}/v1/info", 200)["pairs"]
    if pairs_after != pairs_before:  # one added, one deleted
        raise CheckFailed(f"{pairs_before} pairs before, {pairs_after} after one add and one delete")
    ok(f"deleted pair {victim} left the explanations; {pairs_after} pairs")
    state_path.write_text(json.dumps({"query": query, "labels": labels, "added": added[0], "deleted": victim}))


def verify(url: str, data: Path, state_path: Path, no_pending: bool) -> None:
    state = json.loads(state_path.read_text())
    info = expect(f"{url}/v1/info", 200)
    if no_pending and info["pending_edits"]:
        raise CheckFailed(f"{info['pending_edits']} edits not in a snapshot: the last shutdown wrote none")
    if no_pending:
        ok(
            f"no pending edits: the edits are in the index folder (generation {info['generation']}, "
            f"{info['delta_files']} delta files)"
        )
    held = json.loads((data / "held_out.json").read_text())
    pair = expect(f"{url}/v1/pairs/{state['added']}", 200)
    if pair["caption"] != MARKER:
        raise CheckFailed(f"pair {state['added']} came back as {pair}")
    expect(f"{url}/v1/pairs/{state['deleted']}", 404)
    result = classify(url, data / "images" / held["image"], [MARKER, *state["labels"][1:]])
    if result["label"] != MARKER or state["added"] not in explained_ids(result)[:3]:
        raise CheckFailed(f"added pair {state['added']} no longer explains the held-out photo: {result}")
    after = explained_ids(classify(url, data / "images" / state["query"], state["labels"]))
    if state["deleted"] in after:
        raise CheckFailed(f"deleted pair {state['deleted']} explains {state['query']} again: {after}")
    ok(f"after the restart pair {state['added']} is there and pair {state['deleted']} is gone")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-data")
    p.add_argument("shared", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--images", type=int, default=40)
    p = sub.add_parser("wait-ready")
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=180)
    for name in ("edit", "verify"):
        p = sub.add_parser(name)
        p.add_argument("url")
        p.add_argument("data", type=Path)
        p.add_argument("state", type=Path)
        if name == "verify":
            p.add_argument("--no-pending", action="store_true", help="and every edit is in a snapshot")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "make-data":
            make_data(args.shared, args.out, args.images)
        elif args.cmd == "wait-ready":
            wait_ready(args.url.rstrip("/"), args.timeout)
        elif args.cmd == "edit":
            edit(args.url.rstrip("/"), args.data, args.state)
        else:
            verify(args.url.rstrip("/"), args.data, args.state, args.no_pending)
    except CheckFailed as exc:
        print(f"  FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
