"""The API the web console needs: nearest-anchor search, restoring deleted pairs, explaining any label, the
write-protection flag; and the console's own files (served at /, nothing loaded from elsewhere)."""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from app.api.routes.console import STATIC
from tests.conftest import COLOURS, HashTextEncoder, PixelEncoder, make_client
from tests.test_api import b64, jpeg

LABELS = {"labels": list(COLOURS), "templates": ["a {} square"]}


def live_of(client):
    return client.app.state.asif.live


def test_search_by_text_and_by_image_match_a_dense_scan(client):
    live = live_of(client)
    ids = live.model.text_store.ids()
    for body, role, store, query in (
        ({"text": "a green square number 3", "top": 5}, "text", live.model.text_store, None),
        ({"image": b64(jpeg((30, 200, 40))), "top": 5}, "image", live.model.image_store, None),
    ):
        r = client.post("/v1/search", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["index"] == role and len(out["results"]) == 5
        # Dense reference: cosine of the query's embedding with every stored anchor vector, sorted.
        if role == "text":
            query = HashTextEncoder().encode([body["text"]])[0]
        else:
            query = PixelEncoder().encode([Image.open(io.BytesIO(jpeg((30, 200, 40)))).convert("RGB")])[0]
        sims = store.reconstruct(ids) @ query
        got = np.array([h["similarity"] for h in out["results"]])
        # The five best similarities (ties may go to either id), each reported for the right pair.
        np.testing.assert_allclose(got, np.sort(sims)[::-1][:5], atol=1e-5)
        by_id = dict(zip(ids.tolist(), sims.tolist(), strict=True))
        np.testing.assert_allclose(got, [by_id[h["pair_id"]] for h in out["results"]], atol=1e-5)
        top = out["results"][0]
        assert top["image"].startswith("green_") and top["thumbnail_url"] == f"/v1/pairs/{top['pair_id']}/thumbnail"
        assert top["caption"] == " | ".join(top["captions"])


def test_search_bad_input_is_a_clear_4xx(client):
    cases = [
        ({}, 422, "exactly one of text"),
        ({"text": "   "}, 422, "exactly one of text"),
        ({"text": "red", "image": b64(jpeg())}, 422, "exactly one of text"),
        ({"text": "red", "top": 0}, 422, "top"),
        ({"image": b64(b"not an image")}, 400, "not a recognised image format"),
        ({"image": "%%%"}, 400, "base64"),
    ]
    for body, status, needle in cases:
        r = client.post("/v1/search", json=body)
        assert r.status_code == status and needle in r.json()["detail"], (body, r.status_code, r.text)
    r = client.post("/v1/search", files={"image": ("x.jpg", jpeg(), "image/jpeg")}, data={"top": "3"})
    assert r.status_code == 200 and len(r.json()["results"]) == 3 and r.json()["index"] == "image"


def test_explain_label_explains_that_label_and_its_shares_sum_to_its_score(client):
    body = {"images": [b64(jpeg((220, 30, 30)))], **LABELS, "explain": 1000, "top": 4}
    best = client.post("/v1/classify", json=body).json()["results"][0]
    assert best["label"] == "red"
    scores = dict((s["label"], s["score"]) for s in best["scores"])
    for label in ("red", "blue"):
        r = client.post("/v1/classify", json={**body, "explain_label": label})
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        assert res["label"] == "red" and res["scores"] == best["scores"]  # only the explanation changes
        total = sum(c["contribution"] for c in res["explanation"])
        np.testing.assert_allclose(total, scores[label], rtol=1e-4, atol=1e-6)
    assert (
        best["explanation"]
        != client.post("/v1/classify", json={**body, "explain_label": "blue"}).json()["results"][0]["explanation"]
    )
    r = client.post("/v1/classify", json={**body, "explain_label": "purple"})
    assert r.status_code == 422 and "not one of the labels" in r.json()["detail"]


def test_a_deleted_pair_is_restored_with_its_vectors_captions_and_thumbnail(client):
    # k = every pair: no tie at the k-th place, which goes to the smaller id (the restored pair's id is new).
    body = {"images": [b64(jpeg((30, 40, 220)))], **LABELS, "explain": 5, "top": 4, "k": 20}
    before = client.post("/v1/classify", json=body).json()["results"][0]
    victim = before["explanation"][0]["pair_id"]
    old = client.get(f"/v1/pairs/{victim}").json()
    thumb = client.get(f"/v1/pairs/{victim}/thumbnail").content
    assert client.delete(f"/v1/pairs/{victim}").status_code == 200
    during = client.post("/v1/classify", json=body).json()["results"][0]
    assert during["scores"] != before["scores"]
    r = client.post("/v1/pairs/restore", json={"ids": [victim]})
    assert r.status_code == 200, r.text
    new_id = r.json()["restored"][str(victim)]
    assert new_id != victim  # ids are never reused
    pair = client.get(f"/v1/pairs/{new_id}").json()
    assert (pair["image"], pair["captions"]) == (old["image"], old["captions"])
    assert client.get(f"/v1/pairs/{new_id}/thumbnail").content == thumb
    after = client.post("/v1/classify", json=body).json()["results"][0]
    np.testing.assert_allclose(  # the exact vectors came back
        [x["score"] for x in after["scores"]], [x["score"] for x in before["scores"]], rtol=1e-5, atol=1e-9
    )
    renamed = {new_id if c["pair_id"] == victim else c["pair_id"] for c in before["explanation"]}
    assert {c["pair_id"] for c in after["explanation"]} == renamed
    # Once only; and only pairs this server deleted.
    again = client.post("/v1/pairs/restore", json={"ids": [victim]})
    assert again.status_code == 404 and "not restorable" in again.json()["detail"]
    assert client.post("/v1/pairs/restore", json={"ids": [0, 10**9]}).status_code == 404
    assert client.get("/v1/pairs/0").status_code == 200  # a failed restore changed nothing
    assert client.post("/v1/pairs/restore", json={"ids": []}).status_code == 422


def test_restore_needs_the_key_and_info_says_writes_are_protected(served_index):
    with make_client(served_index[0], api_key="sekrit") as client:
        assert client.get("/v1/info").json()["write_protected"] is True
        auth = {"Authorization": "Bearer sekrit"}
        assert client.delete("/v1/pairs/3", headers=auth).status_code == 200
        assert client.post("/v1/pairs/restore", json={"ids": [3]}).status_code == 401
        assert client.post("/v1/pairs/restore", json={"ids": [3]}, headers=auth).status_code == 200
    with make_client(served_index[0]) as client:
        assert client.get("/v1/info").json()["write_protected"] is False


def test_the_console_is_served_at_the_root_and_loads_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for src in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert not re.match(r"^[a-z]+://|^//", src), src
        if src.startswith("static/"):
            assert client.get("/" + src).status_code == 200
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"https?://|//cdn|@import", text), f"{path.name} refers to another origin"
    # Every API path the script calls is a documented /v1 route.
    script = (STATIC / "console.js").read_text()
    called = set(re.findall(r'api\("(?:GET|POST|PUT|DELETE)", [`"](/v1/[a-z-]+)', script))
    documented = set(client.get("/openapi.json").json()["paths"])
    assert called and all(any(p.startswith(c) for p in documented) for c in called), called - documented
