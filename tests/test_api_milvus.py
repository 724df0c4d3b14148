"""The HTTP API over shared state in Milvus (ASIF_STORE=milvus, milvus-lite): two app replicas over one database,
edits through either, answers from both; the same endpoints and errors as over the index folder."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from asif.serving.shared_loading import open_shared
from tests.conftest import COLOURS, HashTextEncoder, PixelEncoder
from tests.test_api import b64, jpeg

LABELS = {"labels": list(COLOURS), "templates": ["a {} square"], "explain": 10, "top": 4}


@pytest.fixture
def replicas(tmp_path):
    from pymilvus import MilvusClient

    client = MilvusClient(str(tmp_path / "shared.db"))

    def app():
        cfg = Settings(store="milvus", batch_max_wait_ms=1, snapshot_interval_s=3600)
        # k = every pair: no tie at the k-th place (which goes to the smaller id; a restored pair gets a new one).
        factory = lambda s: open_shared(client, "api", PixelEncoder(), HashTextEncoder(), k=12, p=8)  # noqa: E731
        return TestClient(create_app(cfg, live_factory=factory))

    with app() as a, app() as b:
        yield a, b


def add(client, rgb, caption):
    r = client.post("/v1/pairs", json={"pairs": [{"image": b64(jpeg(rgb)), "caption": caption}]})
    assert r.status_code == 201, r.text
    return r.json()["ids"][0]


def test_two_replicas_share_pairs_edits_and_label_sets(replicas):
    a, b = replicas
    assert a.get("/v1/info").json()["pairs"] == 0
    assert a.post("/v1/classify", json={"images": [b64(jpeg())], **LABELS}).status_code == 409  # no pairs yet
    ids = {}
    for colour, rgb in COLOURS.items():
        for j in range(3):
            shade = tuple(min(255, max(0, c + 12 * j)) for c in rgb)
            ids[(colour, j)] = add(a if j % 2 else b, shade, f"a {colour} square number {j}")
    info = b.get("/v1/info").json()
    assert info["pairs"] == 12 and info["pending_edits"] == 0 and info["index"]["image"]["spec"]["backend"] == "milvus"
    # Classified through either replica, with the same answer; explained by the right colour's pairs.
    red = {"images": [b64(jpeg((220, 30, 30)))], **LABELS}
    ra, rb = (c.post("/v1/classify", json=red).json()["results"][0] for c in (a, b))
    assert ra["label"] == rb["label"] == "red"
    sa, sb = ({s["label"]: s["score"] for s in r["scores"]} for r in (ra, rb))  # equal to float32 rounding
    np.testing.assert_allclose([sa[c] for c in sa], [sb[c] for c in sa], rtol=1e-5, atol=1e-9)
    reds = {ids[("red", j)] for j in range(3)}
    assert {c["pair_id"] for c in ra["explanation"]} <= reds | {i for i in ids.values()}
    top = ra["explanation"][0]["pair_id"]
    assert top in reds
    # Deleted through B: gone from A's answers, listing and pair lookups at once.
    assert b.delete(f"/v1/pairs/{top}").status_code == 200
    again = a.post("/v1/classify", json=red).json()["results"][0]
    assert top not in {c["pair_id"] for c in again["explanation"]}
    assert a.get(f"/v1/pairs/{top}").status_code == 404
    assert top not in [p["id"] for p in a.get("/v1/pairs").json()["items"]]
    # Undo on B (which deleted it) adds it back under a new id, seen by A.
    new = b.post("/v1/pairs/restore", json={"ids": [top]}).json()["restored"][str(top)]
    assert a.get(f"/v1/pairs/{new}").json()["captions"] == b.get(f"/v1/pairs/{new}").json()["captions"]
    back = a.post("/v1/classify", json=red).json()["results"][0]
    np.testing.assert_allclose([s["score"] for s in back["scores"]], [s["score"] for s in ra["scores"]], rtol=1e-5)
    # A label set stored through A is used by name through B.
    body = {"labels": list(COLOURS), "templates": ["a {} square"]}
    assert a.put("/v1/label-sets/colours", json=body).status_code == 200
    r = b.post("/v1/classify", json={"images": [b64(jpeg((30, 40, 220)))], "label_set": "colours"})
    assert r.status_code == 200 and r.json()["results"][0]["label"] == "blue"
    # Search reads the shared stores too.
    hits = b.post("/v1/search", json={"text": "a green square number 1", "top": 3}).json()["results"]
    assert hits[0]["pair_id"] == ids[("green", 1)]
