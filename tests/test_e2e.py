"""End to end: `asif build` then `asif serve` (uvicorn in a subprocess on loopback), over real HTTP."""

import base64
import io
import os
import signal
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_pair_collection
from tests.servers import Server, build_command

pytestmark = pytest.mark.slow


def checkerboard() -> bytes:
    tile = np.indices((64, 64)).sum(axis=0) // 8 % 2
    arr = np.stack([tile * 255] * 3, axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def assert_same_results(a, b):
    """Same labels, pairs and captions; scores equal up to float32 rounding (cache updated vs rebuilt)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_results(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_results(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-7)
    else:
        assert a == b


def test_build_serve_edit_restart(tmp_path):
    images, pairs = write_pair_collection(tmp_path / "data", n_per_colour=3)
    index = tmp_path / "index"
    subprocess.run(
        build_command(pairs, images, index, "effnet-lite0", "minilm", "--k", "4"),
        check=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        capture_output=True,
    )
    board = base64.b64encode(checkerboard()).decode()
    query = {"images": [board], "labels": ["checkerboard pattern", "red square", "blue square"], "explain": 10}

    server = Server(index)
    try:
        http = server.http
        assert http.get("/v1/info").json()["pairs"] == 24  # default anchors: one per caption
        first = http.post("/v1/classify", json=query)
        assert first.status_code == 200, first.text
        r = http.post(
            "/v1/pairs", json={"pairs": [{"image": board, "caption": "a black and white checkerboard pattern"}]}
        )
        assert r.status_code == 201, r.text
        (new_id,) = r.json()["ids"]
        used = http.post("/v1/classify", json=query).json()["results"][0]
        assert used["label"] == "checkerboard pattern"
        assert new_id in [a["pair_id"] for a in used["explanation"]]
        assert http.delete(f"/v1/pairs/{new_id}").status_code == 200
        gone = http.post("/v1/classify", json=query).json()["results"][0]
        assert new_id not in [a["pair_id"] for a in gone["explanation"]]
        assert_same_results(gone, first.json()["results"][0])  # forgetting restores the model
        r = http.post("/v1/pairs", json={"pairs": [{"image": board, "caption": "a chessboard", "image_ref": "c.jpg"}]})
        kept_id = r.json()["ids"][0]
        state = http.post("/v1/classify", json=query).json()
    finally:
        code, log = server.stop()
    assert code in (0, -signal.SIGTERM), log  # uvicorn re-raises SIGTERM after a graceful shutdown
    assert "final snapshot: generation 1, 3 edits written" in log

    server = Server(index)
    try:
        http = server.http
        info = http.get("/v1/info").json()
        assert info["pairs"] == 25 and info["pending_edits"] == 0
        assert http.get(f"/v1/pairs/{new_id}").status_code == 404
        assert http.get(f"/v1/pairs/{kept_id}").json()["image"] == "c.jpg"
        assert_same_results(http.post("/v1/classify", json=query).json(), state)
    finally:
        server.stop()
