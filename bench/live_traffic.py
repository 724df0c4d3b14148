"""Live-traffic benchmark of the served model (asif.serving.live.LiveModel) on synthetic embeddings.

    python bench/live_traffic.py --sizes 100000,1000000 --json bench/live_results.json
    python bench/run.py --live --sizes 100000,1000000 --json bench/live_results.json   (the same)

For each n an index folder is written straight from seeded clustered embeddings (1280-d images, 384-d
captions, IVF-PQ + exact re-ranking above 50k pairs, as ``choose_index_spec`` picks), opened as a
LiveModel with 100 stored label sets of 100 classes (7 templates' worth each), k=800, p=8. Measured in
one run, one classify thread issuing single-image requests back to back:

1. classify p50/p99 (a) idle, (b) under ~20 edits/s from another thread (adds of fresh pairs alternating
   with deletes of random existing ids), (c) under the same edits plus a thread taking snapshots back to
   back whenever an edit is pending, (d) while ``compact()`` runs in another thread, no edits (its
   duration too); p99 ratios against idle; 1,000 requests per phase after a warm-up. Phases a-c are
   interleaved in 5 rounds and pooled, so that a slow spell of this noisy machine falls on all three alike;
2. the time and bytes of a snapshot after exactly 1,000 (and 100) edits, beside a full compaction;
3. add and delete latency (quiet, then under traffic) with the 100 label sets registered;
4. the first (and second) classify right after each of those 1,000 edits against steady classification.

For attribution, each classify request records its read-lock wait and the classify thread's CPU time
(the rest is time off CPU: the GIL, a label set's lock, no free core), and whether an edit overlapped it;
each phase counts the model's background jobs (label sets catching up, scorer rebuilds) and the interpreter's
garbage collections.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from threadpoolctl import threadpool_limits

from asif.encoders.base import EncoderIdentity, ImageEncoder, TextEncoder
from asif.serving.labels import DEFAULT_TEMPLATES, CachedLabels, LabelSet, combine_prompt_embeddings
from asif.serving.live import LiveModel
from asif.serving.rwlock import RWLock
from asif.state.metadata import NewPair, PairMetadata
from asif.state.persist import MANIFEST, read_manifest, save_index_folder
from asif.stores import FaissStore, choose_index_spec, set_faiss_threads
from asif.tuning.synthetic import SyntheticWorld
from bench.measure import code_version, peak_rss_mb, percentiles, rss_mb

K, P = 800, 8.0
D_IMAGE, D_TEXT = 1280, 384
N_CLASSES = 100
N_LABEL_SETS = 100
EDIT_RATE = 20.0  # edits per second in the "under edits" phases
QUICK_EDITS = 1_000  # edits before the timed snapshot (part 2), also the edit-latency samples (part 3)
SMALL_EDITS = 100  # a second, smaller snapshot: its cost should scale with the edits
FRESH_PAIRS = 4_096  # pre-generated pairs the adds draw from (cycled)
WARMUP = 50
SAMPLES = 1_000  # classify requests per phase
Sample = tuple[float, float, float, float]  # classify request: start, end, read-lock wait, thread CPU seconds
ROUNDS = 5  # phases a-c are interleaved in this many rounds
MAX_COMPACTIONS = 6  # compaction rounds in phase (d) when one is too short for the wanted samples


class BenchImageEncoder(ImageEncoder):
    """Identity of the bench's image embeddings; never called (the bench passes embeddings)."""

    def __init__(self) -> None:
        self.identity = EncoderIdentity("py:bench.live_traffic:BenchImageEncoder", "bench-image", "image", D_IMAGE, {})

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        raise NotImplementedError("the bench works on embeddings")


class BenchTextEncoder(TextEncoder):
    """Identity of the bench's caption embeddings; never called."""

    def __init__(self) -> None:
        self.identity = EncoderIdentity("py:bench.live_traffic:BenchTextEncoder", "bench-text", "text", D_TEXT, {})

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError("the bench works on embeddings")


class LockTimer:
    """Records, per thread, how long the last acquisition of a readers-writer lock waited.

    It wraps the read and write methods of the lock instance itself, so every holder of the lock (including
    references to its methods taken earlier, such as the model's guard) keeps using the one lock.
    """

    def __init__(self, lock: RWLock) -> None:
        self.local = threading.local()
        read, write = lock.read, lock.write

        @contextmanager
        def timed_read() -> Iterator[None]:
            t = time.perf_counter()
            with read():
                self.local.read_wait = time.perf_counter() - t
                yield

        @contextmanager
        def timed_write() -> Iterator[None]:
            t = time.perf_counter()
            with write():
                self.local.write_wait = time.perf_counter() - t
                yield

        lock.read = timed_read  # type: ignore[method-assign]
        lock.write = timed_write  # type: ignore[method-assign]

    def last_read_wait(self) -> float:
        return float(getattr(self.local, "read_wait", 0.0))

    def last_write_wait(self) -> float:
        return float(getattr(self.local, "write_wait", 0.0))


# -- helpers -------------------------------------------------------------------------------------------
def file_bytes(folder: Path, names: Sequence[str]) -> int:
    return int(sum((folder / name).stat().st_size for name in names))


def generation_files(manifest: dict[str, Any]) -> list[str]:
    """The base files of the manifest's generation (indices and re-ranking tables)."""
    return [name for entry in manifest["indices"].values() for name in entry["sha256"]]


def label_embeddings(world: SyntheticWorld, rng: np.random.Generator) -> np.ndarray:
    """One label set's class embeddings: each class's 7 noisy prompt embeddings, combined (as bench/run.py)."""
    n_templates = len(DEFAULT_TEMPLATES)
    centres = world.centres[:, None, :] + 0.3 * rng.standard_normal((N_CLASSES, n_templates, world.latent_dim)).astype(
        np.float32
    )
    prompts = world._observe(centres.reshape(N_CLASSES * n_templates, -1), world.w_text)
    return combine_prompt_embeddings(prompts, N_CLASSES)


# -- the index folder ----------------------------------------------------------------------------------
def write_index(folder: Path, world: SyntheticWorld, n: int, chunk: int = 100_000) -> dict[str, Any]:
    """Write an index folder of n synthetic pairs (ids 0..n-1), generated and added in chunks."""
    t0 = time.perf_counter()
    specs = {"image": choose_index_spec(n, D_IMAGE), "text": choose_index_spec(n, D_TEXT)}
    stores = {role: FaissStore(dim, specs[role]) for role, dim in (("image", D_IMAGE), ("text", D_TEXT))}
    first = min(n, max(chunk, *(s.train_size for s in specs.values())))
    timings = {"generate_s": 0.0, "train_s": 0.0, "add_s": 0.0}
    start = 0
    while start < n:
        size = first if start == 0 else min(chunk, n - start)
        t = time.perf_counter()
        img, txt = world.anchors(size)
        timings["generate_s"] += time.perf_counter() - t
        ids = np.arange(start, start + size, dtype=np.int64)
        for role, x in (("image", img), ("text", txt)):
            store = stores[role]
            if not store.is_trained:
                t = time.perf_counter()
                n_train = min(size, max(specs[role].train_size, 1))
                sample = x if n_train >= size else x[np.random.default_rng(0).choice(size, n_train, replace=False)]
                store.train(sample)
                timings["train_s"] += time.perf_counter() - t
            t = time.perf_counter()
            store.add(ids, x)
            timings["add_s"] += time.perf_counter() - t
        del img, txt
        start += size
    t = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    metadata = PairMetadata(folder / "pairs.sqlite")
    metadata.insert_pairs((i, f"img{i}.jpg", [f"caption {i}"]) for i in range(n))  # one transaction
    metadata.set_meta("next_pair_id", str(n))
    metadata.close()
    manifest = {
        "image_encoder": BenchImageEncoder().identity.to_dict(),
        "text_encoder": BenchTextEncoder().identity.to_dict(),
        "anchors": "caption",
        "defaults": {"k": K, "p": P},
        "metadata": "pairs.sqlite",
        "counts": {"pairs": n},
    }
    saved = save_index_folder(folder, stores["image"], stores["text"], manifest)
    timings["save_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return {
        "index": {"image": specs["image"].factory, "text": specs["text"].factory, "refine": specs["image"].refine},
        "timings": timings,
        "base_bytes": file_bytes(folder, generation_files(saved)),
        "rss_mb_with_stores": rss_mb(),
    }


# -- traffic ---------------------------------------------------------------------------------------------
class Editor:
    """Alternating single-pair edits: add a fresh pair, delete a random existing id."""

    def __init__(self, live: LiveModel, lock: LockTimer, n: int, world: SyntheticWorld, seed: int) -> None:
        self.live = live
        self.lock = lock
        self.alive = list(range(n))  # the ids held (swap-removed on delete)
        self.rng = np.random.default_rng(seed)
        self.fresh_img, self.fresh_txt = world.anchors(FRESH_PAIRS)
        self.fresh = 0
        self.count = 0

    def add(self) -> tuple[float, float]:
        i = self.fresh % FRESH_PAIRS
        self.fresh += 1
        pair = NewPair(
            f"live{self.fresh}.jpg", [f"live caption {self.fresh}"], None, self.fresh_img[i], self.fresh_txt[i]
        )
        t = time.perf_counter()
        ids = self.live.add_pairs([pair])
        took = time.perf_counter() - t
        self.alive.extend(ids)
        return took, self.lock.last_write_wait()

    def delete(self) -> tuple[float, float]:
        j = int(self.rng.integers(len(self.alive)))
        victim = self.alive[j]
        self.alive[j] = self.alive[-1]
        self.alive.pop()
        t = time.perf_counter()
        done = self.live.delete_pairs([victim])
        took = time.perf_counter() - t
        assert done == [victim], (done, victim)
        return took, self.lock.last_write_wait()

    def step(self) -> tuple[str, float, float]:
        """One edit (add on even counts, delete on odd); returns (op, seconds, seconds waiting for the lock)."""
        op = "add" if self.count % 2 == 0 else "delete"
        self.count += 1
        took, wait = self.add() if op == "add" else self.delete()
        return op, took, wait


class Background(threading.Thread):
    """A daemon loop run until stop(); its first exception is re-raised by stop()."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def body(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        try:
            self.body()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join()
        if self.error is not None:
            raise RuntimeError(f"{self.name} failed") from self.error


class EditStream(Background):
    """Edits at a fixed rate (a late edit is issued at once, then the schedule resumes)."""

    def __init__(self, editor: Editor, rate: float) -> None:
        super().__init__("edits")
        self.editor = editor
        self.rate = rate
        self.intervals: list[tuple[float, float]] = []
        self.latency: dict[str, list[float]] = {"add": [], "delete": []}
        self.lock_wait: list[float] = []

    def body(self) -> None:
        t0 = time.perf_counter()
        i = 0
        while not self.halt.is_set():
            delay = t0 + i / self.rate - time.perf_counter()
            if delay > 0 and self.halt.wait(delay):
                break
            s = time.perf_counter()
            op, took, wait = self.editor.step()
            self.intervals.append((s, time.perf_counter()))
            self.latency[op].append(took)
            self.lock_wait.append(wait)
            i += 1

    @staticmethod
    def pooled(streams: Sequence[EditStream]) -> dict[str, Any]:
        """Edit counts, rate and latencies over several streams (the rounds of one phase)."""
        gaps = sum(len(s.intervals) - 1 for s in streams if len(s.intervals) > 1)
        span = sum(s.intervals[-1][1] - s.intervals[0][0] for s in streams if len(s.intervals) > 1)
        return {
            "edits": sum(len(s.intervals) for s in streams),
            "rate_per_s": gaps / span if span > 0 else float("nan"),
            "add": percentiles([t for s in streams for t in s.latency["add"]]),
            "delete": percentiles([t for s in streams for t in s.latency["delete"]]),
            "write_lock_wait": percentiles([t for s in streams for t in s.lock_wait]),
        }


class SnapshotLoop(Background):
    """``live.snapshot()`` back to back whenever an edit is pending (polling every millisecond otherwise: an
    empty snapshot spun in a tight loop would only measure a busy Python thread)."""

    def __init__(self, live: LiveModel) -> None:
        super().__init__("snapshots")
        self.live = live
        self.took: list[float] = []
        self.written: list[float] = []  # durations of the snapshots that wrote a delta
        self.edits = 0
        self.compacted = 0

    def body(self) -> None:
        while not self.halt.is_set():
            if self.live.pending_edits() == 0:
                self.halt.wait(0.001)
                continue
            t = time.perf_counter()
            info = self.live.snapshot()
            took = time.perf_counter() - t
            self.took.append(took)
            if info.edits:
                self.written.append(took)
                self.edits += info.edits
            self.compacted += int(info.compacted)

    @staticmethod
    def pooled(loops: Sequence[SnapshotLoop]) -> dict[str, Any]:
        """Snapshot counts and durations over several loops (the rounds of one phase)."""
        return {
            "snapshots": sum(len(s.took) for s in loops),
            "snapshots_writing_a_delta": sum(len(s.written) for s in loops),
            "edits_written": sum(s.edits for s in loops),
            "compactions": sum(s.compacted for s in loops),
            "all": percentiles([t for s in loops for t in s.took]),
            "writing": percentiles([t for s in loops for t in s.written]),
        }


class Compaction(Background):
    def __init__(self, live: LiveModel) -> None:
        super().__init__("compaction")
        self.live = live
        self.took = float("nan")

    def body(self) -> None:
        t = time.perf_counter()
        self.live.compact()
        self.took = time.perf_counter() - t


class BackgroundMeter:
    """Counts and times the jobs the model hands to its background executor (registered label sets catching
    up with edits, label-scorer rebuilds)."""

    def __init__(self, live: LiveModel) -> None:
        self.took: list[float] = []
        self._inner = live.model.schedule
        live.model.schedule = self.schedule

    def schedule(self, job: Callable[[], None]) -> None:
        def timed() -> None:
            t = time.perf_counter()
            try:
                job()
            finally:
                self.took.append(time.perf_counter() - t)

        if self._inner is None:
            timed()
        else:
            self._inner(timed)

    def since(self, mark: int) -> dict[str, float]:
        took = self.took[mark:]
        return {"jobs": len(took), "busy_s": float(sum(took)), "mean_ms": 1000 * float(np.mean(took)) if took else 0.0}


class GcMeter:
    """Times the interpreter's garbage collections (every thread waits while one runs: it holds the GIL)."""

    def __init__(self) -> None:
        self.events: list[tuple[int, float]] = []  # (generation, seconds)
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.events.append((int(info["generation"]), time.perf_counter() - self._start))

    def close(self) -> None:
        gc.callbacks.remove(self._callback)

    def since(self, mark: int) -> dict[str, dict[str, float]]:
        out = {}
        for g in (0, 1, 2):
            took = [t for gen, t in self.events[mark:] if gen == g]
            out[f"gen{g}"] = {
                "collections": len(took),
                "total_ms": 1000 * sum(took),
                "max_ms": 1000 * max(took, default=0),
            }
        return out


class Classifier:
    """Single-image classification against one stored label set, recording each request."""

    def __init__(self, live: LiveModel, lock: LockTimer, labels: CachedLabels, queries: np.ndarray) -> None:
        self.live = live
        self.lock = lock
        self.labels = labels
        self.queries = queries
        self.i = 0

    def once(self) -> Sample:
        """(start, end, read-lock wait, this thread's CPU time) of one request."""
        q = self.queries[self.i % len(self.queries)][None, :]
        self.i += 1
        cpu = time.thread_time()
        t = time.perf_counter()
        self.live.classify(q, self.labels, k=K, p=P, top=5)
        end = time.perf_counter()
        return t, end, self.lock.last_read_wait(), time.thread_time() - cpu

    def run(self, count: int, until: Callable[[], bool] | None = None) -> list[Sample]:
        """``count`` requests, or (with ``until``) requests until it returns True, at least one."""
        out = []
        while True:
            out.append(self.once())
            if (until is None and len(out) >= count) or (until is not None and until()):
                return out


def phase_summary(samples: list[Sample], edits: Sequence[tuple[float, float]] = ()) -> dict[str, Any]:
    """Latency percentiles split into read-lock wait, the thread's CPU time and the rest (off CPU: waiting for
    the GIL, another lock or a core), and the requests an edit overlapped against the others."""
    arr = np.asarray(samples, dtype=np.float64).reshape(-1, 4)
    lat, wait, cpu = arr[:, 1] - arr[:, 0], arr[:, 2], arr[:, 3]
    out: dict[str, Any] = {
        "latency": percentiles(lat),
        "read_lock_wait": percentiles(wait),
        "latency_minus_lock_wait": percentiles(lat - wait),
        "thread_cpu": percentiles(cpu),
        "off_cpu_minus_lock_wait": percentiles(np.maximum(lat - wait - cpu, 0.0)),
    }
    if len(edits):
        e = np.asarray(edits, dtype=np.float64)
        order = np.argsort(e[:, 0])
        starts, ends = e[order, 0], np.maximum.accumulate(e[order, 1])
        # A request [s, t] overlaps an edit iff some edit started before t and ended after s.
        last = np.searchsorted(starts, arr[:, 1], side="right") - 1
        hit = (last >= 0) & (ends[np.maximum(last, 0)] > arr[:, 0])
        out["overlapped_by_edit"] = {
            "fraction": float(hit.mean()),
            "overlapped": percentiles(lat[hit]),
            "clear": percentiles(lat[~hit]),
        }
    return out


# -- one size ----------------------------------------------------------------------------------------------
def bench_size(
    n: int, samples: int, seed: int, workdir: Path, verify: bool, label_sets: int = N_LABEL_SETS
) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n, "samples_per_phase": samples, "label_sets": label_sets, "classes": N_CLASSES}
    world = SyntheticWorld(d_image=D_IMAGE, d_text=D_TEXT, n_classes=N_CLASSES, seed=seed)
    folder = workdir / f"index-{n}"
    if folder.exists():
        shutil.rmtree(folder)
    built = write_index(folder, world, n)
    out.update(built)
    gc.collect()
    print(f"  index written in {built['timings']['total_s']:.1f} s; RSS {rss_mb():.0f} MB", file=sys.stderr, flush=True)

    t = time.perf_counter()
    live = LiveModel(folder, BenchImageEncoder(), BenchTextEncoder(), verify=verify, compact_ratio=1e9)
    lock = LockTimer(live.lock)
    out["open_s"] = time.perf_counter() - t
    rng = np.random.default_rng(seed + 1)
    names = tuple(f"class {i}" for i in range(N_CLASSES))
    t = time.perf_counter()
    for s in range(label_sets):
        live.put_label_set(f"set{s:03d}", LabelSet(names, DEFAULT_TEMPLATES), label_embeddings(world, rng))
    wait_idle = getattr(live, "wait_idle", None)  # background label maintenance, where the model has it
    if wait_idle is not None:
        wait_idle()
    out["register_label_sets_s"] = time.perf_counter() - t
    out["rss_mb_loaded"] = rss_mb()
    print(
        f"  opened in {out['open_s']:.1f} s, {label_sets} label sets in {out['register_label_sets_s']:.1f} s; "
        f"RSS {out['rss_mb_loaded']:.0f} MB",
        file=sys.stderr,
        flush=True,
    )
    labels = live.label_set("set000")
    assert labels is not None
    queries, _ = world.queries(2_000)
    classifier = Classifier(live, lock, labels, queries)
    editor = Editor(live, lock, n, world, seed + 2)
    background = BackgroundMeter(live)
    gcs = GcMeter()
    phases: dict[str, Any] = {}

    # Parts 2-4, quiet: 1,000 edits, each followed by two classifies; snapshot; 100 more; snapshot; compaction.
    latency: dict[str, list[float]] = {"add": [], "delete": []}
    first, second = [], []
    mark, gc_mark = len(background.took), len(gcs.events)
    for _ in range(QUICK_EDITS):
        op, took, _ = editor.step()
        latency[op].append(took)
        first.append(classifier.once())
        second.append(classifier.once())
    out["edit_latency"] = {op: percentiles(v) for op, v in latency.items()}
    out["edit_latency"]["first_add_after_open_ms"] = 1000 * latency["add"][0]
    out["after_edit"] = {"first": phase_summary(first), "second": phase_summary(second)}
    out["background_jobs_during_quiet_edits"] = background.since(mark)
    out["gc_during_quiet_edits"] = gcs.since(gc_mark)
    snapshots = {}
    for label, count in ((f"after_{QUICK_EDITS}_edits", 0), (f"after_{SMALL_EDITS}_edits", SMALL_EDITS)):
        for _ in range(count):
            editor.step()
        manifest_before = read_manifest(folder)
        t = time.perf_counter()
        info = live.snapshot()
        took = time.perf_counter() - t
        delta = live.manifest["deltas"][-1]
        assert not info.compacted and len(live.manifest["deltas"]) == len(manifest_before.get("deltas", [])) + 1
        snapshots[label] = {
            "s": took,
            "edits": info.edits,
            "delta_bytes": file_bytes(folder, [delta["file"]]),
            "manifest_bytes": file_bytes(folder, [MANIFEST]),
            "adds": delta["adds"],
            "deletes": delta["deletes"],
        }
    rss_before = rss_mb()
    t = time.perf_counter()
    live.compact()
    took = time.perf_counter() - t
    snapshots["full_compaction"] = {
        "s": took,
        "bytes": file_bytes(folder, generation_files(live.manifest)),
        "generation": int(live.manifest["generation"]),
        "rss_mb_before": rss_before,
        "peak_rss_mb_after": peak_rss_mb(),
    }
    out["snapshot_cost"] = snapshots
    gc.collect()
    print(f"  quiet edits, snapshots and compaction done; RSS {rss_mb():.0f} MB", file=sys.stderr, flush=True)

    # (a) idle, (b) under a steady stream of edits, (c) edits and back-to-back snapshots: interleaved in
    # ROUNDS rounds and pooled per phase, so that a slow spell of the machine falls on every phase alike.
    classifier.run(WARMUP)
    pooled: dict[str, list[Sample]] = {"idle": [], "edits": [], "snapshots": []}
    streams: dict[str, list[EditStream]] = {"edits": [], "snapshots": []}
    loops: list[SnapshotLoop] = []
    marks = {"background": len(background.took), "gc": len(gcs.events)}
    for r in range(ROUNDS):
        count = samples // ROUNDS + (1 if r < samples % ROUNDS else 0)
        pooled["idle"].extend(classifier.run(count))
        for name in ("edits", "snapshots"):
            stream = EditStream(editor, EDIT_RATE)
            snaps = SnapshotLoop(live) if name == "snapshots" else None
            stream.start()
            if snaps is not None:
                snaps.start()
            pooled[name].extend(classifier.run(count))
            if snaps is not None:
                snaps.stop()
                loops.append(snaps)
            stream.stop()
            streams[name].append(stream)
    for name, samples_of in pooled.items():
        intervals = [iv for s in streams.get(name, []) for iv in s.intervals]
        phases[name] = phase_summary(samples_of, intervals)
        if name in streams:
            phases[name]["edit_stream"] = EditStream.pooled(streams[name])
    phases["snapshots"]["snapshot_loop"] = SnapshotLoop.pooled(loops)
    out["during_phases_a_to_c"] = {  # background jobs and collections, over the three phases together
        "background_jobs": background.since(marks["background"]),
        "gc": gcs.since(marks["gc"]),
    }
    live.snapshot()  # the edits after the loop's last snapshot
    print("  phases a-c done", file=sys.stderr, flush=True)

    # (d) during compaction(s) (no edits): until enough samples, at most MAX_COMPACTIONS rounds
    got, durations, folded, gc_mark = [], [], [], len(gcs.events)
    while len(got) < samples and len(durations) < MAX_COMPACTIONS:
        if not live.manifest.get("deltas"):
            editor.step()
            editor.step()
            live.snapshot()
        folded.append(len(live.manifest.get("deltas", [])))
        job = Compaction(live)
        job.start()
        got.extend(classifier.run(0, until=lambda job=job: not job.is_alive()))
        job.stop()
        durations.append(job.took)
    phases["compaction"] = phase_summary(got) | {
        "compaction_s": durations,
        "delta_files_folded": folded,
        "generation_bytes": file_bytes(folder, generation_files(live.manifest)),
        "gc": gcs.since(gc_mark),
    }
    out["classify"] = phases
    idle = phases["idle"]["latency"]["p99_ms"]
    out["p99_ratio_vs_idle"] = {name: phases[name]["latency"]["p99_ms"] / idle for name in phases if name != "idle"}
    out["rss_mb_end"] = rss_mb()
    out["peak_rss_mb"] = peak_rss_mb()
    gcs.close()
    live.close()
    del live, labels, classifier, editor
    gc.collect()
    shutil.rmtree(folder, ignore_errors=True)
    return out


# -- report ----------------------------------------------------------------------------------------------------
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--samples", type=int, default=None, help=f"classify requests per phase (default {SAMPLES:,})")
    parser.add_argument("--label-sets", type=int, default=N_LABEL_SETS, help="stored label sets of 100 classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench/live_results.json"))
    parser.add_argument("--workdir", type=Path, default=None, help="where index folders are written (a temp dir)")
    parser.add_argument("--faiss-threads", type=int, default=1)
    parser.add_argument("--blas-threads", type=int, default=1, help="numpy BLAS threads (ASIF_BLAS_THREADS)")
    parser.add_argument("--no-verify", action="store_true", help="skip checksums on load and compaction")
    parser.add_argument(
        "--switch-interval", type=float, default=None, help="sys.setswitchinterval (s) for a GIL experiment"
    )
    args = parser.parse_args(argv)
    if args.label_sets < 1:
        parser.error("--label-sets must be at least 1 (classification uses the first)")
    set_faiss_threads(args.faiss_threads)  # as the service does (ASIF_FAISS_THREADS), in every thread
    threadpool_limits(args.blas_threads, user_api="blas")  # as the service does (ASIF_BLAS_THREADS)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below on SIGTERM too
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="asif-live-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    report: dict[str, Any] = {
        "machine": machine,
        "k": K,
        "p": P,
        "edit_rate_per_s": EDIT_RATE,
        "faiss_threads": args.faiss_threads,
        "switch_interval_s": sys.getswitchinterval(),
        "verify_checksums": not args.no_verify,
        "code": code_version(),
        "results": [],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            print(f"n={n:,} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            load_before = os.getloadavg()
            samples = args.samples or SAMPLES
            result = bench_size(n, samples, args.seed, workdir, not args.no_verify, args.label_sets)
            result["wall_s"] = time.perf_counter() - t
            result["loadavg_1_5_15"] = {"before": load_before, "after": os.getloadavg()}
            result["code"] = code_version()  # the serving code may change between sizes of a long run
            report["results"].append(result)
            report.update(wall_s=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())
            args.json.write_text(json.dumps(report, indent=2))  # after each size: a crash keeps the others
            print(f"  n={n:,} done in {result['wall_s']:.0f} s; peak RSS {peak_rss_mb():.0f} MB", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(report["results"]))
    print(f"\nwall {report['wall_s']:.0f} s, peak RSS {report['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
