"""End-to-end benchmark: the request a user sends, over loopback HTTP, against the encoder alone (issue #26).

    python bench/e2e.py --sizes demo,1m --runtimes onnx,torch --json bench/e2e_results.json
    python bench/e2e.py --sizes demo,1m --synthetic-n 100000 --runtimes onnx     (a quicker check)

For each index size x server runtime, ``asif serve`` runs as a subprocess (``--log-level warning``, no API key)
and a stdlib ``http.client`` client (keep-alive, multipart bodies of the raw JPEG bytes built before the clock
starts, so that the client takes little of the 2 cores it shares with the server) sends real photos
(Imagenette val JPEGs, a different photo per request) and measures:

1. single-image ``POST /v1/classify`` against a stored 10-label set (the Imagenette classes, 7 default templates):
   p50/p99 over sequential requests after a warm-up;
2. a 32-image classify request: ms per image (p50 request latency / 32);
3. N concurrent clients (threads, one keep-alive connection each) sending single-image requests: images/s over a
   fixed window after a warm-up;
4. ``POST /v1/search`` with a text (distinct Flickr8k captions): p50/p99;
5. an inline 10-label classify (the same labels in the request): p50/p99 after a warm-up (the first call embeds
   the labels and caches their representations; its latency is reported apart as ``inline_first_ms``).

Each phase also records the server's CPU time (``/proc/<pid>/stat``), this client's CPU time, the server's own view
of the route latency and the image encoder's mean batch size (``/metrics`` deltas).

Index sizes: ``demo`` (Flickr8k, 40,450 pairs, effnet-lite0 + MiniLM, built into ``runs/demo`` if missing) and
synthetic sizes (``1m``, ``100k``, ``250000``): an index of n seeded synthetic pairs (``bench.live_traffic``'s
``write_index``) whose manifest names the real encoders, so that the served model runs real photos through the real
networks against synthetic anchors; cached under ``--cache`` (``runs/e2e``).

The floor, measured in this process while no server runs: the image encoder alone under each runtime, batch 1 and
batch 32, (a) the network alone (``encode_prepared`` on prepared arrays) and (b) decode + prepare + network
(``open_image`` on the JPEG bytes, ``prepare``, ``encode_prepared``); the text encoder at batch 1.

The machine is shared: before the floor and each server the bench waits (``--quiet-wait``) for other processes to
go quiet, measures the cores they used during every phase (``/proc/stat`` less this process and the server),
measures the floor again (``--floor-tries``) when they were busy, and flags the figures taken under contention.

Ratios against the targets of the issue (each server column against the floor of its own runtime): single-image
p50 / floor batch 1 <= 2, p99 / p50 <= 2, 32-image ms/img / floor batch 32 ms/img <= 1.3, concurrent img/s /
floor batch-32 img/s >= 0.6; each against both floors (decode+prepare+network, network alone).
"""

from __future__ import annotations

import argparse
import csv
import gc
import http.client
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asif.encoders import load_image_encoder, load_text_encoder
from asif.encoders.images import open_image
from asif.state.persist import MANIFEST, read_manifest, write_json_atomic
from asif.tuning.synthetic import SyntheticWorld
from bench.live_traffic import D_IMAGE, D_TEXT, N_CLASSES, write_index
from bench.measure import code_version, percentiles

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
IMAGE_SPEC, TEXT_SPEC = "effnet-lite0", "minilm"
LABEL_SET = "e2e-imagenette"
BOUNDARY = "asif-e2e-5f1c"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
JSON_TYPE = "application/json"
NOISY = 0.25  # cores used by other processes above which a figure is flagged
Request = tuple[str, str, bytes | None, str | None]  # method, path, body, content type

TARGETS: list[tuple[str, str, str, float]] = [  # name, description, "<=" or ">=", target
    ("single_p50_vs_floor_b1", "1-image p50 / floor b1 (decode+prep+net)", "<=", 2.0),
    ("single_p50_vs_net_b1", "1-image p50 / floor b1 (network alone)", "<=", 2.0),
    ("single_p99_vs_p50", "1-image p99 / p50", "<=", 2.0),
    ("batch32_vs_floor_b32", "32-image ms/img / floor b32 (decode+prep+net)", "<=", 1.3),
    ("batch32_vs_net_b32", "32-image ms/img / floor b32 (network alone)", "<=", 1.3),
    ("concurrent_vs_floor_b32", "concurrent img/s / floor b32 img/s (decode+prep+net)", ">=", 0.6),
    ("concurrent_vs_net_b32", "concurrent img/s / floor b32 img/s (network alone)", ">=", 0.6),
]


# -- inputs --------------------------------------------------------------------------------------------------
def parse_size(token: str) -> int | str:
    """``demo`` or a pair count: ``1m``, ``100k``, ``250000``."""
    token = token.strip().lower()
    if token == "demo":
        return token
    scale = {"k": 1_000, "m": 1_000_000}.get(token[-1:], 1)
    return int(float(token.rstrip("km")) * scale)


def size_name(size: int | str) -> str:
    if isinstance(size, str):
        return size
    return f"{size // 1_000_000}m" if size % 1_000_000 == 0 else f"{size // 1_000}k" if size % 1_000 == 0 else str(size)


def load_photos(root: Path, seed: int) -> list[bytes]:
    """Every Imagenette val JPEG's bytes, in a seeded random order."""
    paths = sorted(root.glob("*/*.jpg")) + sorted(root.glob("*/*.JPEG"))
    if not paths:
        raise SystemExit(f"no JPEGs under {root}")
    order = np.random.default_rng(seed).permutation(len(paths))
    return [paths[i].read_bytes() for i in order]


def load_classes(path: Path) -> list[str]:
    return [line.split("\t")[1].strip() for line in path.read_text().splitlines() if "\t" in line]


def load_captions(path: Path, n: int) -> list[str]:
    """n distinct Flickr8k captions, one per image (every fifth row)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [row["caption"] for row in csv.DictReader(fh)]
    return list(dict.fromkeys(rows[::5]))[:n]


# -- requests ------------------------------------------------------------------------------------------------
def multipart(images: Sequence[bytes], fields: dict[str, str]) -> bytes:
    """A multipart/form-data body: ``images`` file parts (the raw JPEG bytes) and text fields."""
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{i}.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + blob
        + b"\r\n"
        for i, blob in enumerate(images)
    ]
    parts += [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    return b"".join([*parts, f"--{BOUNDARY}--\r\n".encode()])


def classify(images: Sequence[bytes], fields: dict[str, str]) -> Request:
    return ("POST", "/v1/classify", multipart(images, fields), MULTIPART)


def search(text: str) -> Request:
    return ("POST", "/v1/search", json.dumps({"text": text, "top": 12}).encode(), JSON_TYPE)


@dataclass
class Outcomes:
    """Status codes of every timed request, and the first few error bodies."""

    codes: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, status: int, body: bytes, path: str) -> None:
        with self.lock:
            self.codes[status] += 1
            if status != 200 and len(self.errors) < 5:
                self.errors.append(f"{status} {path}: {body[:300].decode(errors='replace')}")


class Client:
    """One keep-alive HTTP/1.1 connection to the server."""

    def __init__(self, port: int, outcomes: Outcomes) -> None:
        self.port, self.outcomes = port, outcomes
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def send(self, req: Request) -> tuple[int, bytes]:
        method, path, body, ctype = req
        headers = {"Content-Type": ctype} if ctype else {}
        try:
            self.conn.request(method, path, body=body, headers=headers)
            resp = self.conn.getresponse()
        except (ConnectionError, http.client.HTTPException):  # a dropped keep-alive connection: one retry
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
            self.conn.request(method, path, body=body, headers=headers)
            resp = self.conn.getresponse()
        return resp.status, resp.read()

    def timed(self, req: Request) -> tuple[float, float]:
        """(start, end) of one request, its outcome recorded."""
        start = time.perf_counter()
        status, body = self.send(req)
        end = time.perf_counter()
        self.outcomes.record(status, body, req[1])
        return start, end

    def close(self) -> None:
        self.conn.close()


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


# -- phases --------------------------------------------------------------------------------------------------
def sequential(client: Client, requests: Sequence[Request]) -> list[float]:
    """Latencies (s) of requests sent one after another."""
    return [end - start for start, end in map(client.timed, requests)]


def concurrent(
    port: int, outcomes: Outcomes, requests: Sequence[Request], clients: int, warmup_s: float, window_s: float
) -> dict[str, Any]:
    """``clients`` threads send requests back to back; completions inside the window after the warm-up count."""
    spans: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    lo, hi = t0 + warmup_s, t0 + warmup_s + window_s

    def worker(offset: int) -> None:
        client, mine, i = Client(port, outcomes), [], offset
        while time.perf_counter() < hi:
            mine.append(client.timed(requests[i % len(requests)]))
            i += clients
        client.close()
        spans.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [(s, e) for s, e in spans if lo <= e < hi]
    return {
        "clients": clients,
        "window_s": window_s,
        "requests_total": len(spans),
        "requests_in_window": len(done),
        "images_per_s": len(done) / window_s,
        "latency": percentiles([e - s for s, e in done if s >= lo]),
    }


class Phase:
    """Attribution of one phase, from its start: server and client CPU, the server's latency and encoder batches."""

    def __init__(self, server: Server, client: Client) -> None:
        self.server, self.client = server, client
        self.scrape0 = scrape(client)
        self.wall0, self.server0, self.client0 = time.perf_counter(), server.cpu_s(), time.process_time()
        self.others = Others(lambda: server.cpu_s() + time.process_time())

    def summary(self, route: str, images: int) -> dict[str, Any]:
        wall, others = time.perf_counter() - self.wall0, self.others.cores()
        server_cpu, client_cpu = self.server.cpu_s() - self.server0, time.process_time() - self.client0
        after = scrape(self.client)
        lat_sum, lat_count = metric_delta(self.scrape0, after, "asif_request_seconds", f'route="{route}"')
        batch_sum, batch_count = metric_delta(self.scrape0, after, "asif_encoder_batch_size", 'encoder="image"')
        per = max(images, 1)
        return {
            "wall_s": wall,
            "server_cpu_ms_per_image": 1000 * server_cpu / per,
            "client_cpu_ms_per_image": 1000 * client_cpu / per,
            "server_cpu_cores": server_cpu / wall,
            "server_mean_ms": 1000 * lat_sum / lat_count if lat_count else None,
            "server_requests": lat_count,
            "encoder_mean_batch": batch_sum / batch_count if batch_count else None,
            "others_cores": others,
        }


@dataclass
class Workload:
    """Request bodies built before any clock starts."""

    stored: list[Request]
    inline: list[Request]
    batch32: list[Request]
    crowd: list[Request]
    searches: list[Request]
    put_label_set: Request


def workload(photos: list[bytes], labels: list[str], captions: list[str], args: argparse.Namespace) -> Workload:
    n1, nb = args.warmup + args.requests, args.batch_warmup + args.batch_requests
    stored_fields, inline_fields = {"label_set": LABEL_SET}, {"labels": json.dumps(labels)}
    cursor = itertools.count()

    def take(n: int) -> list[bytes]:
        return [photos[next(cursor) % len(photos)] for _ in range(n)]

    return Workload(
        stored=[classify([p], stored_fields) for p in take(n1)],
        inline=[classify([p], inline_fields) for p in take(n1 + 1)],
        batch32=[classify(take(32), stored_fields) for _ in range(nb)],
        crowd=[classify([p], stored_fields) for p in photos],
        searches=[search(c) for c in captions[:n1]],
        put_label_set=("PUT", f"/v1/label-sets/{LABEL_SET}", json.dumps({"labels": labels}).encode(), JSON_TYPE),
    )


def timed_phase(
    server: Server, client: Client, requests: Sequence[Request], warmup: int, route: str, per_request: int = 1
) -> dict[str, Any]:
    """Sequential requests: the first ``warmup`` untimed, then latency percentiles and the attribution."""
    sequential(client, requests[:warmup])
    phase = Phase(server, client)
    lat = sequential(client, requests[warmup:])
    return {"latency": percentiles(lat), **phase.summary(route, per_request * len(lat))}


def measure_server(server: Server, work: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """Every HTTP figure against one running server."""
    outcomes = Outcomes()
    client = Client(server.port, outcomes)
    start, end = client.timed(work.put_label_set)
    out: dict[str, Any] = {"label_set_put_ms": 1000 * (end - start)}
    out["classify_stored"] = timed_phase(server, client, work.stored, args.warmup, "/v1/classify")
    start, end = client.timed(work.inline[0])
    out["inline_first_ms"] = 1000 * (end - start)
    out["classify_inline"] = timed_phase(server, client, work.inline[1:], args.warmup, "/v1/classify")
    out["classify_32"] = timed_phase(server, client, work.batch32, args.batch_warmup, "/v1/classify", 32)
    out["classify_32"]["ms_per_image"] = out["classify_32"]["latency"]["p50_ms"] / 32
    phase = Phase(server, client)
    crowd = concurrent(server.port, outcomes, work.crowd, args.clients, args.crowd_warmup_s, args.crowd_seconds)
    out["concurrent"] = {**crowd, **phase.summary("/v1/classify", crowd["requests_total"])}
    out["search"] = timed_phase(server, client, work.searches, args.warmup, "/v1/search")
    client.send(("DELETE", f"/v1/label-sets/{LABEL_SET}", None, None))
    client.close()
    out["status_codes"] = {str(k): v for k, v in sorted(outcomes.codes.items())}
    out["errors"] = outcomes.errors
    return out


# -- the floor -----------------------------------------------------------------------------------------------
def time_calls(fn: Callable[[Any], object], items: Sequence[Any], warmup: int = 3) -> list[float]:
    for item in items[:warmup]:
        fn(item)
    times = []
    for item in items:
        t = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - t)
    return times


def image_floor(runtime: str, photos: list[bytes], n1: int, n32: int) -> dict[str, Any]:
    enc = load_image_encoder(IMAGE_SPEC, runtime=runtime)
    singles = photos[:n1]
    prepared = [enc.prepare(open_image(b)) for b in singles]
    batches = [photos[i * 32 : (i + 1) * 32] for i in range(n32)]
    prepared_batches = [[enc.prepare(open_image(b)) for b in batch] for batch in batches]

    def full(blobs: Sequence[bytes]) -> np.ndarray:
        return enc.encode_prepared([enc.prepare(open_image(b)) for b in blobs])

    runtime_used = getattr(getattr(enc, "forward", None), "runtime", runtime)
    out: dict[str, Any] = {
        "runtime": runtime_used,
        "decode_prepare": percentiles(time_calls(lambda b: enc.prepare(open_image(b)), singles)),
        "net_b1": percentiles(time_calls(lambda p: enc.encode_prepared([p]), prepared)),
        "full_b1": percentiles(time_calls(lambda b: full([b]), singles)),
        "net_b32": percentiles(time_calls(enc.encode_prepared, prepared_batches, warmup=1)),
        "full_b32": percentiles(time_calls(full, batches, warmup=1)),
    }
    for kind in ("net", "full"):
        p50 = out[f"{kind}_b32"]["p50_ms"]
        out[f"{kind}_b32_ms_per_image"], out[f"{kind}_b32_images_per_s"] = p50 / 32, 32_000 / p50
    return out


def text_floor(runtime: str, captions: list[str]) -> dict[str, Any]:
    enc = load_text_encoder(TEXT_SPEC, runtime=runtime)
    return percentiles(time_calls(lambda c: enc.encode([c]), captions))


def floor_once(runtime: str, photos: list[bytes], captions: list[str], args: argparse.Namespace) -> dict[str, Any]:
    quiet = wait_for_quiet(args.quiet_wait)
    others = Others(time.process_time)
    out = image_floor(runtime, photos, args.floor_singles, args.floor_batches)
    out["text_b1"] = text_floor(runtime, captions[: args.floor_singles])
    out.update(quiet_wait=quiet, others_cores=others.cores())
    gc.collect()
    return out


def floor(
    runtimes: Sequence[str], photos: list[bytes], captions: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Each runtime's floor; measured again (up to --floor-tries) while other processes used the cores."""
    out: dict[str, Any] = {}
    for runtime in runtimes:
        for attempt in range(1, args.floor_tries + 1):
            print(f"floor: {runtime} (try {attempt}) ...", flush=True)
            res = floor_once(runtime, photos, captions, args)
            res["tries"] = attempt
            if runtime not in out or res["others_cores"] < out[runtime]["others_cores"]:
                out[runtime] = res
            if res["others_cores"] <= NOISY:
                break
    return out


# -- the indices ---------------------------------------------------------------------------------------------
def ensure_demo(folder: Path, data: Path) -> dict[str, Any]:
    """The Flickr8k demo index, built if missing."""
    if (folder / MANIFEST).is_file():
        return {"built": False}
    cmd = [
        str(Path(sys.executable).with_name("asif")),
        "build",
        "--pairs",
        str(data / "flickr8k" / "captions.csv"),
        "--images-root",
        str(data / "flickr8k" / "images"),
        "--out",
        str(folder),
        "--image-encoder",
        IMAGE_SPEC,
        "--text-encoder",
        TEXT_SPEC,
    ]
    print("building the demo index:", " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=server_env())
    return {"built": True, "build_s": time.perf_counter() - t}


def real_identities() -> dict[str, dict[str, Any]]:
    image, text = load_image_encoder(IMAGE_SPEC), load_text_encoder(TEXT_SPEC)
    return {"image_encoder": image.identity.to_dict(), "text_encoder": text.identity.to_dict()}


def ensure_synthetic(cache: Path, n: int, identities: dict[str, dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """n synthetic pairs whose manifest names the real encoders; reused when cached with the same identities."""
    folder = cache / f"synthetic-{n}"
    if (folder / MANIFEST).is_file():
        manifest = read_manifest(folder)
        same = all(manifest.get(role) == ident for role, ident in identities.items())
        if same and int(manifest.get("counts", {}).get("pairs", -1)) == n:
            return folder, {"cached": True}
    partial = cache / f"synthetic-{n}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    print(f"writing {n:,} synthetic pairs to {folder} ...", flush=True)
    info = write_index(partial, SyntheticWorld(d_image=D_IMAGE, d_text=D_TEXT, n_classes=N_CLASSES, seed=0), n)
    manifest = read_manifest(partial)
    manifest.update(identities)  # encoder identities are not covered by the files' checksums
    write_json_atomic(partial / MANIFEST, manifest)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    gc.collect()
    return folder, {"cached": False, **{k: v for k, v in info.items() if k != "rss_mb_with_stores"}}


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


# -- main ----------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return {
        "cpu_count": os.cpu_count(),
        "cpu": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def index_for(size: int | str, args: argparse.Namespace, ids: Callable[[], dict[str, Any]]) -> tuple[Path, dict]:
    if size == "demo":
        return args.demo_index, ensure_demo(args.demo_index, args.data)
    assert isinstance(size, int)
    return ensure_synthetic(args.cache, size, ids())


def serve_and_measure(index: Path, runtime: str, work: Workload, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    server = Server(index, runtime, args.cache / "logs" / f"serve-{tag}-{runtime}.log")
    try:
        ready = server.wait_ready(args.ready_timeout)
        print(f"  {tag}/{runtime}: ready in {ready:.1f} s on port {server.port}", flush=True)
        quiet = wait_for_quiet(args.quiet_wait)
        return {"ready_s": ready, "quiet_wait": quiet, **measure_server(server, work, args)}
    finally:
        server.stop()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="demo,1m", help="demo and/or synthetic pair counts (1m, 100k, 250000)")
    p.add_argument("--synthetic-n", type=int, help="replace the synthetic sizes of --sizes with this count")
    p.add_argument("--runtimes", default="onnx", help="server (and floor) runtimes: onnx, torch or onnx,torch")
    p.add_argument("--floor-runtimes", default="onnx,torch", help="runtimes of the floor (plus those of --runtimes)")
    p.add_argument("--data", type=Path, default=DATA, help="the shared data folder (flickr8k, imagenette)")
    p.add_argument("--demo-index", type=Path, default=ROOT / "runs" / "demo")
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "e2e", help="synthetic indices and server logs")
    p.add_argument("--requests", type=int, default=200, help="timed sequential requests (single, inline, search)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch-requests", type=int, default=10, help="timed 32-image requests")
    p.add_argument("--batch-warmup", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--crowd-seconds", type=float, default=10.0, help="window of the concurrent phase")
    p.add_argument("--crowd-warmup-s", type=float, default=2.0)
    p.add_argument("--floor-singles", type=int, default=100, help="batch-1 calls per floor figure")
    p.add_argument("--floor-tries", type=int, default=3, help="floor measurements while others use the cores")
    p.add_argument("--floor-batches", type=int, default=10, help="batch-32 calls per floor figure")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="before the floor and each server: wait up to this long for "
        "other processes to use < 0.25 cores (2-core machine shared with builds and tests)",
    )
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "e2e_results.json")
    args = p.parse_args(argv)
    sizes = [parse_size(t) for t in args.sizes.split(",") if t.strip()]
    if args.synthetic_n:
        sizes = [s if s == "demo" else args.synthetic_n for s in sizes]
    args.sizes = list(dict.fromkeys(sizes))
    args.runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    floor_runtimes = [r.strip() for r in args.floor_runtimes.split(",") if r.strip()]
    args.floor_runtimes = list(dict.fromkeys([*floor_runtimes, *args.runtimes]))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    t0 = time.perf_counter()
    photos = load_photos(args.data / "imagenette" / "val", args.seed)
    labels = load_classes(args.data / "imagenette" / "classes.tsv")
    captions = load_captions(args.data / "flickr8k" / "captions.csv", args.warmup + args.requests)
    cached_ids: dict[str, Any] = {}

    def ids() -> dict[str, Any]:
        return cached_ids.setdefault("ids", real_identities())

    indices = {size: index_for(size, args, ids) for size in args.sizes}
    cached_ids.clear()
    gc.collect()
    fl = floor(args.floor_runtimes, photos, captions, args)  # no server runs yet
    work = workload(photos, labels, captions, args)
    runs = []
    for size, (folder, prep) in indices.items():
        pairs = int(read_manifest(folder).get("counts", {}).get("pairs", 0))
        for runtime in args.runtimes:
            run = serve_and_measure(folder, runtime, work, args, size_name(size))
            run.update(size=size_name(size), pairs=pairs, runtime=runtime, index=str(folder), index_prep=prep)
            run["ratios"] = ratios(run, fl[runtime])
            runs.append(run)
    settings = {k: v for k, v in vars(args).items() if k not in ("sizes", "runtimes", "floor_runtimes")}
    settings.update(
        sizes=[size_name(s) for s in args.sizes],
        runtimes=args.runtimes,
        floor_runtimes=args.floor_runtimes,
        client="http.client multipart",
    )
    settings["asif_env"] = {k: v for k, v in os.environ.items() if k.startswith("ASIF_") and k != "ASIF_API_KEY"}
    results = {
        "machine": machine(),
        "code": code_version(),
        "settings": settings,
        "targets": {key: {"description": d, "op": op, "target": t} for key, d, op, t in TARGETS},
        "floor": fl,
        "runs": runs,
        "wall_s": time.perf_counter() - t0,
    }
    write_results(args.json, results, report(results))
    return 0


def write_results(path: Path, results: dict[str, Any], table: str) -> None:
    """A bench's results as JSON, and its table on stdout."""
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table)
    print(f"\nwrote {path} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    raise SystemExit(main())
