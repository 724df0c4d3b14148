"""The service under live edits: ad-hoc label lists off the write lock and bounded in bytes, label sets at the
size limit, listings while sets change, rejected edits never logged."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
from PIL import Image

from asif.serving.live import LiveModel
from tests.conftest import PixelEncoder, make_client


def b64_jpeg(rgb: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), rgb).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


RED = b64_jpeg((220, 30, 30))


def count_writes(live: LiveModel) -> list[int]:
    calls: list[int] = []
    real = live.lock.write

    def counting():
        calls.append(1)
        return real()

    live.lock.write = counting  # type: ignore[method-assign]
    return calls


def test_inline_label_lists_stay_off_the_write_lock_and_are_bounded_in_bytes(served_index):
    with make_client(served_index[0]) as client:
        live = client.app.state.asif.live
        writes = count_writes(live)
        first = client.post("/v1/classify", json={"images": [RED], "labels": ["red", "blue"]})
        assert first.status_code == 200, first.text
        one = live.inline_cache_usage()[1]
        live.inline_cache_bytes = int(2.5 * one)  # room for two such lists
        for i in range(6):
            r = client.post("/v1/classify", json={"images": [RED], "labels": [f"red {i}", f"blue {i}"]})
            assert r.status_code == 200, r.text
        assert writes == []  # no request above took the write side
        count, nbytes = live.inline_cache_usage()
        assert count == 2 and nbytes <= live.inline_cache_bytes
        cache = client.get("/v1/info").json()["inline_label_cache"]
        assert cache == {"count": 2, "bytes": nbytes}
        # An edit, then an ad-hoc list cached before it: it catches up (the deleted pair never shows).
        again = {"images": [RED], "labels": ["red 5", "blue 5"], "explain": 50, "k": 5}
        top = client.post("/v1/classify", json=again).json()["results"][0]["explanation"][0]["pair_id"]
        assert client.delete(f"/v1/pairs/{top}").status_code == 200
        after = client.post("/v1/classify", json=again).json()["results"][0]
        assert top not in [a["pair_id"] for a in after["explanation"]]


def test_a_label_set_at_the_size_limit_is_embedded_and_used(served_index):
    with make_client(served_index[0]) as client:
        settings = client.app.state.asif.settings
        names = [f"thing {i}" for i in range(settings.max_labels)]  # x 7 default templates = 70,000 prompts
        assert settings.max_labels * 7 > settings.max_queue * 16  # more prompts than the text queue holds
        r = client.put("/v1/label-sets/big", json={"labels": names})
        assert r.status_code == 200, r.text
        assert len(r.json()["labels"]) == settings.max_labels and len(r.json()["templates"]) == 7
        r = client.post("/v1/classify", json={"images": [RED], "label_set": "big", "top": 3})
        assert r.status_code == 200, r.text
        assert len(r.json()["results"][0]["scores"]) == 3
        too_many = client.put("/v1/label-sets/bigger", json={"labels": [*names, "one more"]})
        assert too_many.status_code == 422


def test_listings_while_label_sets_change_never_fail(served_index):
    with make_client(served_index[0]) as client:
        stop = threading.Event()
        failures: list[str] = []

        def lister() -> None:
            while not stop.is_set():
                for path in ("/v1/label-sets", "/v1/info"):
                    r = client.get(path)
                    if r.status_code != 200:
                        failures.append(f"{path}: {r.status_code} {r.text}")

        threads = [threading.Thread(target=lister) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            for i in range(15):
                assert client.put(f"/v1/label-sets/s{i}", json={"labels": ["red", f"x{i}"]}).status_code == 200
                r = client.post("/v1/classify", json={"images": [RED], "labels": ["red", f"y{i}"]})
                assert r.status_code == 200
                if i % 3 == 0:
                    assert client.delete(f"/v1/label-sets/s{i}").status_code == 200
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not failures, failures[:3]
        assert len(client.get("/v1/label-sets").json()["label_sets"]) == 10


class NanForBlack(PixelEncoder):
    """A faulty image encoder: NaN features for black images (same identity as PixelEncoder)."""

    def encode(self, images):
        out = super().encode(images)
        for i, im in enumerate(images):
            if max(im.convert("L").getextrema()) < 10:
                out[i] = np.nan
        return out


def test_a_rejected_edit_gets_a_4xx_and_is_never_replayed(served_index):
    index = served_index[0]
    with make_client(index, image_encoder=NanForBlack()) as client:
        bad = {"pairs": [{"image": RED, "caption": "red"}, {"image": b64_jpeg((0, 0, 0)), "caption": "black"}]}
        r = client.post("/v1/pairs", json=bad)
        assert r.status_code == 422 and "NaN" in r.json()["detail"]
        info = client.get("/v1/info").json()
        assert info["pairs"] == 20 and info["pending_edits"] == 0 and info["version"] == 0  # nothing logged
        ok = client.post("/v1/pairs", json={"pairs": [{"image": RED, "caption": "red again"}]})
        assert ok.status_code == 201
        (good,) = ok.json()["ids"]
        assert good >= 20
    with make_client(index) as client:  # restart: the good edit is there, the rejected one never was
        assert client.get("/v1/info").json()["pairs"] == 21
        assert [p["id"] for p in client.get("/v1/pairs", params={"after": 19}).json()["items"]] == [good]
