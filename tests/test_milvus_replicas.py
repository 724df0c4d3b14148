"""Several `asif serve` processes over one Milvus: `milvus-lite server` on loopback and two replicas
(ASIF_STORE=milvus). A pair added through A explains a classification through B; a pair deleted through B never
appears again in A's answers; after kill -9 of a replica in the middle of edits, the other keeps serving and no
acknowledged edit is lost."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import pytest
from PIL import Image

from tests.conftest import COLOURS
from tests.servers import Server

pytestmark = pytest.mark.slow


def jpeg(rgb) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), rgb).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def replica(uri, tmp_path, name):
    env = {
        "ASIF_STORE": "milvus",
        "ASIF_MILVUS_URI": uri,
        "ASIF_MILVUS_PREFIX": "replicas",
        "ASIF_IMAGE_ENCODER": "py:tests.conftest:PixelEncoder",
        "ASIF_TEXT_ENCODER": "py:tests.conftest:HashTextEncoder",
        "ASIF_API_KEY": "",
    }
    return Server(tmp_path / f"unused-{name}", env=env)


def add(server, rgb, caption):
    r = server.http.post("/v1/pairs", json={"pairs": [{"image": jpeg(rgb), "caption": caption}]})
    assert r.status_code == 201, r.text
    return r.json()["ids"][0]


def explained(server, rgb):
    body = {"images": [jpeg(rgb)], "labels": list(COLOURS), "templates": ["a {} square"], "explain": 50}
    r = server.http.post("/v1/classify", json=body)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    return result["label"], [c["pair_id"] for c in result["explanation"]]


def test_two_serve_processes_share_one_milvus(milvus_server, tmp_path):
    a = replica(milvus_server, tmp_path, "a")
    b = replica(milvus_server, tmp_path, "b")
    try:
        for colour, rgb in COLOURS.items():
            add(a, rgb, f"a {colour} square")
        # Added through A, explains a classification through B.
        purple = (150, 20, 160)
        new = add(a, purple, "a purple square")
        assert new in explained(b, purple)[1]
        # Deleted through B: never again in A's answers.
        assert b.http.delete(f"/v1/pairs/{new}").status_code == 200
        for _ in range(3):
            assert new not in explained(a, purple)[1]
        assert a.http.get(f"/v1/pairs/{new}").status_code == 404

        # kill -9 of A in the middle of edits: B keeps serving, and every add A acknowledged is there.
        acknowledged: list[int] = []
        stop = threading.Event()

        def edit_through_a() -> None:
            i = 0
            while not stop.is_set():
                try:
                    acknowledged.append(add(a, (10 * (i % 25), 100, 50), f"pair {i} added through a"))
                except (httpx.HTTPError, AssertionError):
                    return  # A is gone
                i += 1

        editor = threading.Thread(target=edit_through_a)
        editor.start()
        time.sleep(3)
        a.kill()
        stop.set()
        editor.join(timeout=30)
        assert acknowledged, "no edit went through A before the kill"
        for pid in acknowledged:
            assert b.http.get(f"/v1/pairs/{pid}").status_code == 200, pid
        assert explained(b, (220, 30, 30))[0] == "red"
        info = b.http.get("/v1/info").json()
        assert info["pairs"] >= 4 + len(acknowledged)
    finally:
        for server in (a, b):
            if server.proc.poll() is None:
                server.stop()
