"""The HTTP API through httpx (FastAPI's TestClient), on a tiny colour index with fast encoders."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import COLOURS, MilvusTarget, make_client


def jpeg(rgb=(220, 30, 30), size=(32, 32), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


COLOUR_LABELS = {"labels": list(COLOURS), "templates": ["a {} square"]}


def test_health_ready_info_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["pairs"] == 20
    info = client.get("/v1/info").json()
    assert info["pairs"] == 20 and info["anchors"] == "image"
    assert info["defaults"] == {"k": 10, "p": 8.0, "weighting": {"kind": "power", "param": 8.0}}
    assert info["encoders"]["image"]["name"] == "pixels-4x4" and info["index"]["image"]["exact"] is True
    assert info["index"]["text"]["ntotal"] == 20 and info["index"]["image"]["spec"]["backend"] in ("faiss", "milvus")
    client.post("/v1/classify", json={"images": [b64(jpeg())], **COLOUR_LABELS})
    text = client.get("/metrics").text
    assert 'asif_requests_total{method="POST",route="/v1/classify",status="200"} 1.0' in text
    assert "asif_pairs 20.0" in text and "asif_encoder_batch_size_count" in text
    assert "/v1/classify" in client.get("/openapi.json").json()["paths"]


def test_openapi_references_resolve(client):
    """Every $ref of /openapi.json names a component that exists; the JSON bodies the routes parse themselves are
    described there with their fields (what client generators and the fuzzer read)."""
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    refs: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            refs.extend([node["$ref"]] if isinstance(node.get("$ref"), str) else [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    prefix = "#/components/schemas/"
    assert refs and all(r.startswith(prefix) for r in refs), refs
    assert sorted({r[len(prefix) :] for r in refs} - set(components)) == []
    bodies = {path: schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
              for path in ("/v1/classify", "/v1/similarity", "/v1/search", "/v1/pairs")}  # fmt: skip
    assert bodies == {path: prefix + name for path, name in [("/v1/classify", "ClassifyJSON"), ("/v1/similarity",
        "SimilarityJSON"), ("/v1/search", "SearchJSON"), ("/v1/pairs", "NewPairsJSON")]}  # fmt: skip
    assert {"images", "labels", "k"} <= set(components["ClassifyJSON"]["properties"])
    assert {"text", "top"} <= set(components["SearchJSON"]["properties"])


def test_classify_json_and_multipart(client):
    imgs = [jpeg(rgb) for rgb in COLOURS.values()]
    r = client.post("/v1/classify", json={"images": [b64(i) for i in imgs], **COLOUR_LABELS, "explain": 3, "top": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == 10 and body["pairs"] == 20
    assert [res["label"] for res in body["results"]] == list(COLOURS)
    for colour, res in zip(COLOURS, body["results"], strict=True):
        assert len(res["scores"]) == 2 and res["scores"][0]["score"] >= res["scores"][1]["score"]
        assert res["explanation"] and colour in res["explanation"][0]["caption"]
        assert res["explanation"][0]["thumbnail_url"] == f"/v1/pairs/{res['explanation'][0]['pair_id']}/thumbnail"
    files = [("images", (f"{c}.jpg", i, "image/jpeg")) for c, i in zip(COLOURS, imgs, strict=True)]
    data = {"labels": list(COLOURS), "templates": ["a {} square"], "k": "5", "p": "4"}
    r = client.post("/v1/classify", files=files, data=data)
    assert r.status_code == 200, r.text
    assert [res["label"] for res in r.json()["results"]] == list(COLOURS) and r.json()["k"] == 5
    r = client.post("/v1/classify", files=files[:1], data={"labels": '["red", "blue"]'})
    assert r.status_code == 200 and r.json()["results"][0]["label"] == "red"


def test_unknown_threshold_and_k_capped(client):
    r = client.post("/v1/classify", json={"images": [b64(jpeg())], **COLOUR_LABELS, "threshold": 1.0})
    assert r.json()["results"][0]["label"] == "unknown" and r.json()["results"][0]["unknown"]
    r = client.post("/v1/classify", json={"images": [b64(jpeg())], **COLOUR_LABELS, "k": 5000})
    assert r.status_code == 200 and r.json()["k"] == 20


def test_similarity(client):
    texts = ["a red square", "a blue square"]
    r = client.post(
        "/v1/similarity", json={"images": [b64(jpeg((220, 30, 30))), b64(jpeg((30, 40, 220)))], "texts": texts}
    )
    assert r.status_code == 200, r.text
    m = np.array(r.json()["matrix"])
    assert m.shape == (2, 2) and m[0, 0] > m[0, 1] and m[1, 1] > m[1, 0]
    files = [("images", ("a.jpg", jpeg(), "image/jpeg"))]
    r = client.post("/v1/similarity", files=files, data={"texts": texts})
    assert r.status_code == 200 and len(r.json()["matrix"][0]) == 2


def test_classify_and_similarity_take_a_weighting(client):
    body = {"images": [b64(jpeg(rgb)) for rgb in COLOURS.values()], **COLOUR_LABELS, "top": len(COLOURS)}

    def ask(**extra):
        r = client.post("/v1/classify", json={**body, **extra})
        assert r.status_code == 200, r.text
        out = r.json()
        by_label = [sorted(res["scores"], key=lambda x: x["label"]) for res in out["results"]]
        return out, np.array([[s["score"] for s in row] for row in by_label])

    default, power = ask()
    assert (default["weighting"], default["weighting_param"], default["p"]) == ("power", 8.0, 8.0)
    soft, soft_scores = ask(weighting="softmax")
    assert (soft["weighting"], soft["weighting_param"], soft["p"]) == ("softmax", 0.1, None)
    assert not np.allclose(soft_scores, power, atol=1e-3)  # the weighting reached the scores
    assert [r["label"] for r in soft["results"]] == list(COLOURS)
    np.testing.assert_allclose(ask(t=0.1)[1], soft_scores, atol=1e-6)  # t alone names the softmax
    rank, _ = ask(r0=5)
    assert (rank["weighting"], rank["weighting_param"]) == ("rank", 5.0)
    assert ask(weighting="power", p=2)[0]["weighting_param"] == 2.0
    np.testing.assert_allclose(ask(p=8)[1], power, atol=1e-6)
    files = [("images", ("a.jpg", jpeg(), "image/jpeg"))]
    r = client.post("/v1/classify", files=files, data={"labels": list(COLOURS), "weighting": "rank", "r0": "3"})
    assert r.status_code == 200 and r.json()["weighting_param"] == 3.0, r.text
    aug, aug_scores = ask(augment=["flip", "crop"])
    assert aug["augment"] == ["flip", "crop"] and [r["label"] for r in aug["results"]] == list(COLOURS)
    np.testing.assert_allclose(aug_scores, power, atol=1e-5)  # plain squares: every view is the same image
    r = client.post("/v1/classify", files=files, data={"labels": list(COLOURS), "augment": ["crop", "flip"]})
    assert r.status_code == 200 and r.json()["augment"] == ["crop", "flip"], r.text
    sim = {"images": [b64(jpeg())], "texts": ["a red square", "a blue square"]}
    r = client.post("/v1/similarity", json={**sim, "weighting": "softmax", "t": 0.2})
    assert r.status_code == 200 and (r.json()["weighting"], r.json()["weighting_param"]) == ("softmax", 0.2)


def test_label_sets_crud_and_persistence(served_index):
    index_dir, _ = served_index
    with make_client(index_dir) as client:
        r = client.put("/v1/label-sets/colours", json=COLOUR_LABELS)
        assert r.status_code == 200 and r.json()["labels"] == list(COLOURS)
        assert [s["name"] for s in client.get("/v1/label-sets").json()["label_sets"]] == ["colours"]
        assert client.get("/v1/label-sets/colours").json()["templates"] == ["a {} square"]
        r = client.post("/v1/classify", json={"images": [b64(jpeg((30, 200, 40)))], "label_set": "colours"})
        assert r.json()["results"][0]["label"] == "green"
        assert client.put("/v1/label-sets/bad name!", json=COLOUR_LABELS).status_code == 422
    with make_client(index_dir) as client:  # restarted: still there
        assert client.get("/v1/label-sets/colours").status_code == 200
        assert client.delete("/v1/label-sets/colours").json() == {"deleted": "colours"}
        assert client.get("/v1/label-sets/colours").status_code == 404
        assert client.delete("/v1/label-sets/colours").status_code == 404
        r = client.post("/v1/classify", json={"images": [b64(jpeg())], "label_set": "colours"})
        assert r.status_code == 404 and "unknown label set" in r.json()["detail"]


def test_add_explain_delete_and_restart(served_index):
    index_dir, _ = served_index
    in_folder = not isinstance(index_dir, MilvusTarget)  # Milvus: time-ordered ids, no snapshots
    purple = jpeg((150, 20, 160))
    with make_client(index_dir) as client:
        labels = {"labels": ["red", "purple"], "templates": ["a {} square"], "explain": 20, "k": 3}
        before = client.post("/v1/classify", json={"images": [b64(purple)], **labels}).json()["results"][0]
        r = client.post(
            "/v1/pairs", json={"pairs": [{"image": b64(purple), "caption": "a purple square", "image_ref": "p.jpg"}]}
        )
        assert r.status_code == 201, r.text
        (new_id,) = r.json()["ids"]
        assert new_id == 20 if in_folder else new_id > 20
        after = client.post("/v1/classify", json={"images": [b64(purple)], **labels}).json()["results"][0]
        assert after["label"] == "purple" and before["label"] != "purple"
        assert new_id in [a["pair_id"] for a in after["explanation"]]
        pair = client.get(f"/v1/pairs/{new_id}").json()
        assert pair["image"] == "p.jpg" and pair["captions"] == ["a purple square"]
        thumb = client.get(f"/v1/pairs/{new_id}/thumbnail")
        assert thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
        files = {"image": ("x.jpg", jpeg((10, 10, 10)), "image/jpeg")}
        r = client.post("/v1/pairs", files=files, data={"caption": ["a black square", "darkness"]})
        assert r.status_code == 201
        (black_id,) = r.json()["ids"]
        assert black_id == 21 if in_folder else black_id > new_id
        assert client.delete(f"/v1/pairs/{new_id}").json() == {"deleted": new_id}
        gone = client.post("/v1/classify", json={"images": [b64(purple)], **labels}).json()["results"][0]
        assert new_id not in [a["pair_id"] for a in gone["explanation"]]
        assert client.get(f"/v1/pairs/{new_id}").status_code == 404
        assert client.delete(f"/v1/pairs/{new_id}").status_code == 404  # twice
        assert client.get("/v1/info").json()["pairs"] == 21
    with make_client(index_dir) as client:  # restart: snapshot flushed at shutdown (folder), or read from Milvus
        info = client.get("/v1/info").json()
        assert info["pairs"] == 21 and info["pending_edits"] == 0
        if in_folder:
            assert info["generation"] == 1 and info["delta_files"] == 1  # the shutdown snapshot: a delta
        assert client.get(f"/v1/pairs/{new_id}").status_code == 404
        assert client.get(f"/v1/pairs/{black_id}").json()["captions"] == ["a black square", "darkness"]
        again = client.post("/v1/classify", json={"images": [b64(purple)], **labels}).json()["results"][0]
        assert again == gone


def test_pairs_pagination(client):
    page = client.get("/v1/pairs", params={"limit": 8}).json()
    assert [p["id"] for p in page["items"]] == list(range(8)) and page["next_after"] == 7
    page = client.get("/v1/pairs", params={"limit": 8, "after": 15}).json()
    assert [p["id"] for p in page["items"]] == [16, 17, 18, 19] and page["next_after"] is None


def test_write_endpoints_need_the_api_key(served_index):
    with make_client(served_index[0], api_key="s3cret") as client:
        body = {"pairs": [{"image": b64(jpeg()), "caption": "x"}]}
        assert client.post("/v1/pairs", json=body).status_code == 401
        r = client.post("/v1/pairs", json=body, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert client.delete("/v1/pairs/1").status_code == 401
        assert client.put("/v1/label-sets/a", json=COLOUR_LABELS).status_code == 401
        assert client.delete("/v1/label-sets/a").status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/pairs", json=body, headers=ok).status_code == 201
        assert client.delete("/v1/pairs/1", headers=ok).status_code == 200
        assert client.put("/v1/label-sets/a", json=COLOUR_LABELS, headers=ok).status_code == 200
        # Reads stay open.
        assert client.get("/v1/pairs/2").status_code == 200
        assert client.post("/v1/classify", json={"images": [b64(jpeg())], "label_set": "a"}).status_code == 200


BIG = 50_000


def bomb_png() -> bytes:
    """A tiny PNG whose header claims 50,000 x 50,000 pixels."""
    import struct
    import zlib

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", BIG, BIG, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        ({"images": [b64(b"")], **COLOUR_LABELS}, 400, "empty"),
        ({"images": [b64(jpeg()[:200])], **COLOUR_LABELS}, 400, "truncated"),
        ({"images": [b64(b"hello, I am text")], **COLOUR_LABELS}, 400, "not a recognised image"),
        ({"images": [b64(bomb_png())], **COLOUR_LABELS}, 400, "pixels"),
        ({"images": ["***not base64***"], **COLOUR_LABELS}, 400, "base64"),
        ({"images": [], **COLOUR_LABELS}, 422, "at least one image"),
        ({"images": [b64(jpeg())], "labels": []}, 422, "labels"),
        ({"images": [b64(jpeg())], "labels": [f"l{i}" for i in range(10_001)]}, 422, "too many labels"),
        ({"images": [b64(jpeg())], "labels": ["a", "b", "a"]}, 422, "duplicated"),
        ({"images": [b64(jpeg())], "labels": ["a"], "templates": ["no placeholder"]}, 422, "placeholder"),
        ({"images": [b64(jpeg())], **COLOUR_LABELS, "k": 0}, 422, "k"),
        ({"images": [b64(jpeg())], **COLOUR_LABELS, "p": 0}, 422, "p"),
        ({"images": [b64(jpeg())], **COLOUR_LABELS, "p": 1000}, 422, "p must be"),
        ({"images": [b64(jpeg())], **COLOUR_LABELS, "weighting": "cosine"}, 422, "weighting"),
        ({"images": [b64(jpeg())], **COLOUR_LABELS, "t": 0}, 422, "t"),
        ({"images": [b64(jpeg())], **COLOUR_LABELS, "p": 2, "t": 0.1}, 422, "p and t belong to different"),
        ({"images": [b64(jpeg())], **COLOUR_LABELS, "weighting": "rank", "t": 0.1}, 422, "t does not apply"),
        ({"images": [b64(jpeg())], **COLOUR_LABELS, "augment": ["rotate"]}, 422, "augment"),
        ({"images": [b64(jpeg())], **COLOUR_LABELS, "label_set": "x"}, 422, "not both"),
        ({"images": [b64(jpeg())], "label_set": "nope"}, 404, "unknown label set"),
    ],
)
def test_classify_bad_input(client, payload, status, needle):
    r = client.post("/v1/classify", json=payload)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]


def test_other_bad_input(served_index):
    with make_client(served_index[0], max_upload_bytes=50_000, max_request_bytes=200_000) as client:
        big = b"\xff" * 60_000
        r = client.post("/v1/classify", files=[("images", ("a.jpg", big, "image/jpeg"))], data={"labels": "red"})
        assert r.status_code == 413
        r = client.post("/v1/classify", json={"images": [b64(big)], **COLOUR_LABELS})
        assert r.status_code == 413
        r = client.post("/v1/classify", content=b"x" * 300_000, headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = client.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        r = client.post(
            "/v1/classify", content=b'{"images": ["\xff\xfe"]}', headers={"content-type": "application/json"}
        )
        assert 400 <= r.status_code < 500
        r = client.post("/v1/classify", content=b"a", headers={"content-type": "text/plain"})
        assert r.status_code == 415
        long_caption = {"pairs": [{"image": b64(jpeg()), "caption": "x" * 100_000}]}
        assert client.post("/v1/pairs", json=long_caption).status_code == 422
        assert client.post("/v1/pairs", json={"pairs": [{"image": b64(jpeg()), "caption": "  "}]}).status_code == 422
        assert client.post("/v1/pairs", json={"pairs": []}).status_code == 422
        assert client.get("/v1/pairs/999999").status_code == 404
        assert client.get("/v1/pairs/999999/thumbnail").status_code == 404
        assert client.delete("/v1/pairs/999999").status_code == 404
        assert client.get("/v1/pairs/abc").status_code == 422
        assert client.post("/v1/similarity", json={"images": [b64(jpeg())], "texts": []}).status_code == 422


def test_k_times_labels_is_capped_with_a_clear_422(built_index):
    """A request may not make more label entries (k x labels) than max_label_entries; a stored set at the default k
    is exempt (its representations were made when it was stored)."""
    labels = [f"colour {i}" for i in range(30)]
    with make_client(built_index[0], max_label_entries=200) as client:  # the index: 20 pairs, default k 10
        image = b64(jpeg())
        r = client.post("/v1/classify", json={"images": [image], "labels": labels[:20], "k": 10})
        assert r.status_code == 200, r.text  # 20 x 10 = 200
        r = client.post("/v1/classify", json={"images": [image], "labels": labels[:21]})
        assert r.status_code == 422 and "k x labels = 10 x 21" in r.json()["detail"], r.text
        r = client.post("/v1/classify", json={"images": [image], "labels": labels[:11], "k": 19})
        assert r.status_code == 422 and "19 x 11" in r.json()["detail"]
        assert client.put("/v1/label-sets/many", json={"labels": labels}).status_code == 200
        r = client.post("/v1/classify", json={"images": [image], "label_set": "many"})
        assert r.status_code == 200, r.text  # the default k: made when stored
        r = client.post("/v1/classify", json={"images": [image], "label_set": "many", "k": 12})
        assert r.status_code == 422 and "12 x 30" in r.json()["detail"]
        assert client.post("/v1/classify", json={"images": [image], "label_set": "many", "k": 6}).status_code == 200


def test_classify_balances_a_batch_to_a_prior(client):
    """`balance`: the request's images ranked by their balanced label probabilities (Sinkhorn over the batch,
    checked against plain Sinkhorn on the served scores); a lone image is answered as without it."""
    from tests.test_variants import sinkhorn_reference

    colours = list(COLOURS)
    imgs = [b64(jpeg(rgb)) for rgb in COLOURS.values()] * 2
    body = {"images": imgs, **COLOUR_LABELS, "top": len(colours)}

    def ask(**extra):
        r = client.post("/v1/classify", json={**body, **extra})
        assert r.status_code == 200, r.text
        out = r.json()
        rows = [{s["label"]: s["score"] for s in res["scores"]} for res in out["results"]]
        return out, np.array([[row[c] for c in colours] for row in rows])

    plain, raw = ask()
    assert plain["balanced"] is False
    for prior in (None, [4.0, 1.0, 1.0, 2.0][: len(colours)] + [1.0] * (len(colours) - 4)):
        out, got = ask(balance=True, balance_t=0.2, **({"prior": prior} if prior else {}))
        target = np.full(len(colours), 1.0) if prior is None else np.asarray(prior)
        assert out["balanced"] is True
        np.testing.assert_allclose(got, sinkhorn_reference(raw, 0.2, target / target.sum()), atol=1e-5)
        assert [r["label"] for r in out["results"]] == [colours[i] for i in got.argmax(axis=1)]
    one = {**body, "images": imgs[:1]}
    alone = client.post("/v1/classify", json={**one, "balance": True}).json()
    assert alone["balanced"] is False
    assert alone["results"] == client.post("/v1/classify", json=one).json()["results"]
    files = [("images", (f"{i}.jpg", jpeg(rgb), "image/jpeg")) for i, rgb in enumerate(COLOURS.values())]
    data = {"labels": colours, "balance": "true", "prior": [str(float(i + 1)) for i in range(len(colours))]}
    r = client.post("/v1/classify", files=files, data=data)
    assert r.status_code == 200 and r.json()["balanced"] is True, r.text
    for extra, message in (
        ({"balance": True, "prior": [1.0]}, f"the prior has 1 weights for {len(colours)} labels"),
        ({"balance": True, "prior": [0.0] * len(colours)}, "not all zero"),
        ({"prior": [1.0] * len(colours)}, "apply with balance=true"),
        ({"balance": True, "balance_t": 0}, "balance_t"),
    ):
        r = client.post("/v1/classify", json={**body, **extra})
        assert r.status_code == 422 and message in r.text, (extra, r.text)
