"""Fault injection on Milvus replicas: `milvus-lite server` on loopback and two `asif serve` processes over it
(ASIF_STORE=milvus, the test encoders). Faults come from a failpoint file each server reads at every edit
(``asif.state.faults``). After each case, both replicas' scores equal the dense reference over the pairs that should be
held (vectors computed here from the uploaded images and captions), and the stores hold exactly those pairs."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests import reference
from tests.conftest import HashTextEncoder, PixelEncoder
from tests.servers import Server

pytestmark = pytest.mark.slow

LABELS = ["red", "green", "blue", "yellow", "purple"]
TEMPLATE = "a {} square"
P = 8.0


class World:
    """What the clients sent and were told: caption -> (image bytes); the pairs that should be held."""

    def __init__(self) -> None:
        self.sent: dict[str, bytes] = {}
        self.held: dict[int, str] = {}  # pair id -> caption
        self.rng = np.random.default_rng(0)

    def new_pairs(self, n: int, tag: str) -> list[dict[str, str]]:
        out = []
        for _ in range(n):
            rgb = tuple(int(c) for c in self.rng.integers(0, 256, 3))
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
            caption = f"{tag} pair {len(self.sent)} {LABELS[int(np.argmax(rgb)) % 3]} square"
            self.sent[caption] = buf.getvalue()
            out.append({"image": base64.b64encode(buf.getvalue()).decode(), "caption": caption})
        return out

    def add(self, server: Server, n: int, tag: str) -> list[int]:
        pairs = self.new_pairs(n, tag)
        r = server.http.post("/v1/pairs", json={"pairs": pairs})
        assert r.status_code == 201, r.text
        ids = r.json()["ids"]
        self.held.update(zip(ids, (p["caption"] for p in pairs), strict=True))
        return ids

    def delete(self, server: Server, ids: list[int]) -> None:
        for pid in ids:
            assert server.http.delete(f"/v1/pairs/{pid}").status_code == 200
            del self.held[pid]


def vectors(world: World, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    captions = [world.held[i] for i in ids]
    images = [Image.open(io.BytesIO(world.sent[c])) for c in captions]
    return PixelEncoder().encode(images), HashTextEncoder().encode(captions)


def listed_ids(server: Server) -> dict[int, str]:
    """Every pair the shared metadata lists (paged in id order), id -> caption."""
    out: dict[int, str] = {}
    after: int | None = -1
    while after is not None:
        page = server.http.get("/v1/pairs", params={"after": after, "limit": 1000}).json()
        out.update({p["id"]: p["caption"] for p in page["items"]})
        after = page["next_after"]
    return out


def assert_exact(world: World, *servers: Server, labels: list[str] = LABELS, label_set: str | None = None) -> None:
    """Both replicas: the stores hold exactly the pairs that should be held, and scores equal the reference."""
    ids = sorted(world.held)
    img, txt = vectors(world, ids)
    label_emb = HashTextEncoder().encode([TEMPLATE.format(c) for c in labels])
    queries = [world.new_pairs(1, "query")[0] for _ in range(3)]
    q_img = PixelEncoder().encode([Image.open(io.BytesIO(base64.b64decode(q["image"]))) for q in queries])
    k = min(800, len(ids))
    ref = reference.scores(q_img, label_emb, img, txt, k, P)
    for server in servers:
        assert listed_ids(server) == world.held
        assert server.http.get("/v1/info").json()["pairs"] == len(ids)
        body = {"images": [q["image"] for q in queries], "top": len(labels), "k": k, "p": P, "explain": 5}
        body.update({"label_set": label_set} if label_set else {"labels": labels, "templates": [TEMPLATE]})
        r = server.http.post("/v1/classify", json=body)
        assert r.status_code == 200, r.text
        for b, result in enumerate(r.json()["results"]):
            got = {s["label"]: s["score"] for s in result["scores"]}
            np.testing.assert_allclose([got[c] for c in labels], ref[b], atol=2e-5)
            assert {c["pair_id"] for c in result["explanation"]} <= set(world.held)


def put_colours(server: Server) -> None:
    """Store the label set "colours" (LABELS with TEMPLATE) through this replica."""
    r = server.http.put("/v1/label-sets/colours", json={"labels": LABELS, "templates": [TEMPLATE]})
    assert r.status_code == 200, r.text


@pytest.fixture
def cluster(milvus_server, tmp_path):
    """Start replicas on demand (each with its own failpoint file); all stopped at the end."""
    started: list[Server] = []

    def start(name: str, faults_text: str = "") -> tuple[Server, Path]:
        faults = tmp_path / f"faults-{name}"
        faults.write_text(faults_text)
        server = Server(
            tmp_path / f"unused-{name}",
            env={
                "ASIF_STORE": "milvus",
                "ASIF_MILVUS_URI": milvus_server,
                "ASIF_MILVUS_PREFIX": "faults",
                "ASIF_IMAGE_ENCODER": "py:tests.conftest:PixelEncoder",
                "ASIF_TEXT_ENCODER": "py:tests.conftest:HashTextEncoder",
                "ASIF_API_KEY": "",
                "ASIF_FAILPOINTS": str(faults),
                "ASIF_MILVUS_PENDING_TIMEOUT_S": "2",
                "ASIF_MAX_PAIRS_PER_REQUEST": "1000",
                "ASIF_MAX_IMAGES": "1000",
            },
        )
        started.append(server)
        return server, faults

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.stop()


def test_a_burst_of_17000_edits_is_followed_whole(cluster):
    # One query returns at most 16,384 rows: the follower must page through the writer's records. B's stored
    # label set (made before the burst) is exact only if B applied every record.
    world = World()
    (a, _), (b, _) = cluster("a"), cluster("b")
    world.add(a, 10, "base")
    put_colours(b)
    assert_exact(world, b, a, label_set="colours")
    for _ in range(17):
        world.add(a, 1000, "burst")
    world.delete(a, sorted(world.held)[::997][:10])
    assert_exact(world, b, a, label_set="colours")


def test_failed_edit_records_leave_the_replicas_equal(cluster):
    world = World()
    (a, faults), (b, _) = cluster("a"), cluster("b")
    world.add(a, 20, "base")
    assert_exact(world, a, b)
    for point in ("milvus.log_intents", "milvus.commit"):
        faults.write_text(f"{point}=error\n")
        r = a.http.post("/v1/pairs", json={"pairs": world.new_pairs(3, "failed")})
        assert r.status_code == 503, r.text  # undone: never held under an id the client was not told
        victim = sorted(world.held)[0]
        r = a.http.delete(f"/v1/pairs/{victim}")
        assert r.status_code == 503, r.text
        faults.write_text("")
        if a.http.get(f"/v1/pairs/{victim}").status_code == 404:  # the delete reached the stores, then failed
            del world.held[victim]
        assert_exact(world, a)
        world.add(a, 2, "after")  # the writer goes on: this commit covers the failed edits' records too
        assert_exact(world, b, a)


def test_kill_between_the_store_write_and_the_commit(cluster):
    world = World()
    (a, faults), (b, _) = cluster("a"), cluster("b")
    world.add(a, 20, "base")
    put_colours(a)
    assert_exact(world, a, b, label_set="colours")
    faults.write_text("shared.before_commit=kill\n")
    pairs = world.new_pairs(2, "killed")
    with pytest.raises(httpx.TransportError):
        a.http.post("/v1/pairs", json={"pairs": pairs})
    assert a.proc.wait(timeout=30) == -9
    # The pairs reached both stores under ids no client was told: they are listed, and once B settles the dead
    # writer's intents (after 2 s without a commit), B's stored label set holds them too.
    new = {pid: cap for pid, cap in listed_ids(b).items() if cap.startswith("killed")}
    assert sorted(new.values()) == sorted(p["caption"] for p in pairs)
    world.held.update(new)
    time.sleep(2.5)
    assert_exact(world, b, label_set="colours")
    a2, _ = cluster("a2")  # a restarted replica starts from the shared state
    assert_exact(world, a2, b, label_set="colours")
    world.add(a2, 3, "more")
    world.delete(b, sorted(new)[:1])
    assert_exact(world, a2, b, label_set="colours")


def test_a_replica_whose_clock_is_40_s_behind_is_followed(cluster):
    world = World()
    (b, _), (a, _) = cluster("b"), cluster("a", faults_text="clock.offset_s=-40\n")
    put_colours(b)
    world.add(b, 10, "on time")
    assert_exact(world, a, b, label_set="colours")
    world.add(a, 10, "late")
    world.delete(a, sorted(world.held)[:3])
    assert_exact(world, b, a, label_set="colours")
    world.add(b, 5, "on time again")
    world.delete(b, sorted(world.held)[-4:])
    assert_exact(world, a, b, label_set="colours")


def test_concurrent_puts_of_one_label_set_leave_one_whole_set(cluster):
    world = World()
    (a, _), (b, _) = cluster("a"), cluster("b")
    world.add(a, 30, "base")
    bodies = {
        "a": {"labels": ["red", "green", "blue"], "templates": [TEMPLATE]},
        "b": {"labels": ["yellow", "purple", "red", "blue"], "templates": [TEMPLATE]},
    }
    assert a.http.put("/v1/label-sets/colours", json=bodies["a"]).status_code == 200
    errors: list[str] = []
    seen: list[int] = []
    done = threading.Event()

    def put(server: Server, body: dict) -> None:
        for _ in range(12):
            r = server.http.put("/v1/label-sets/colours", json=body)
            if r.status_code != 200:
                errors.append(r.text)

    def read(server: Server) -> None:  # the set exists throughout: it must never be missing
        while not done.is_set():
            seen.append(server.http.get("/v1/label-sets/colours").status_code)

    writers = [threading.Thread(target=put, args=(s, bodies[n])) for n, s in (("a", a), ("b", b))]
    readers = [threading.Thread(target=read, args=(s,)) for s in (a, b)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join(300)
    done.set()
    for t in readers:
        t.join(60)
    assert not errors and seen and set(seen) == {200}, (errors, sorted(set(seen)))
    got = [s.http.get("/v1/label-sets/colours") for s in (a, b)]
    assert [r.status_code for r in got] == [200, 200], [r.text for r in got]
    labels = [r.json()["labels"] for r in got]
    assert labels[0] == labels[1] and labels[0] in (bodies["a"]["labels"], bodies["b"]["labels"])
    assert_exact(world, a, b, labels=labels[0], label_set="colours")


def test_undo_through_the_other_replica(cluster):
    world = World()
    (a, _), (b, _) = cluster("a"), cluster("b")
    world.add(a, 12, "base")
    victim = sorted(world.held)[3]
    caption = world.held[victim]
    world.delete(a, [victim])
    assert_exact(world, a, b)
    r = b.http.post("/v1/pairs/restore", json={"ids": [victim]})
    assert r.status_code == 200, r.text
    new_id = r.json()["restored"][str(victim)]
    world.held[new_id] = caption
    assert_exact(world, a, b)
    assert b.http.post("/v1/pairs/restore", json={"ids": [victim]}).status_code == 404  # restored once
