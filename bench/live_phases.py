"""One size of the live-traffic bench (bench/live_traffic.py): write the synthetic index, open it as a LiveModel
with its label sets, then the quiet edits, snapshots and compaction, and the classify phases a-d."""

from __future__ import annotations

import gc
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from asif.serving.labels import DEFAULT_TEMPLATES, LabelSet
from asif.serving.live import LiveModel
from asif.state.persist import MANIFEST, read_manifest
from asif.tuning.synthetic import SyntheticWorld
from bench.live_meters import BackgroundMeter, Classifier, GcMeter, LockTimer, Sample, phase_summary
from bench.live_workers import Compaction, Editor, EditStream, SnapshotLoop
from bench.measure import peak_rss_mb, percentiles, rss_mb
from bench.synthetic_index import (
    D_IMAGE,
    D_TEXT,
    N_CLASSES,
    BenchImageEncoder,
    BenchTextEncoder,
    file_bytes,
    generation_files,
    label_embeddings,
    write_index,
)

N_LABEL_SETS = 100
EDIT_RATE = 20.0  # edits per second in the "under edits" phases
QUICK_EDITS = 1_000  # edits before the timed snapshot (part 2), also the edit-latency samples (part 3)
SMALL_EDITS = 100  # a second, smaller snapshot: its cost should scale with the edits
WARMUP = 50
SAMPLES = 1_000  # classify requests per phase
ROUNDS = 5  # phases a-c are interleaved in this many rounds
MAX_COMPACTIONS = 6  # compaction rounds in phase (d) when one is too short for the wanted samples


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
