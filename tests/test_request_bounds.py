"""Bounded cost for anonymous requests (issue 28, first part): bodies counted as they arrive, templates capped."""

from __future__ import annotations

import json

from tests.conftest import make_client
from tests.test_api import b64, jpeg


def test_a_chunked_body_is_counted_as_it_arrives(built_index):
    """A body without Content-Length (chunked) is refused with a 413 once the bytes received pass the limit."""
    with make_client(built_index[0], max_request_bytes=200_000) as client:
        sent = []

        def chunks():
            body = json.dumps({"images": [b64(jpeg())] * 300, "labels": ["red", "blue"]}).encode()
            assert len(body) > 200_000
            for start in range(0, len(body), 16_384):
                sent.append(start)
                yield body[start : start + 16_384]

        r = client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "larger than the limit of 200000 bytes" in r.json()["detail"], r.text
        # A chunked body under the limit is served.
        small = json.dumps({"images": [b64(jpeg())], "labels": ["red", "blue"]}).encode()
        r = client.post(
            "/v1/classify", content=iter([small[:100], small[100:]]), headers={"content-type": "application/json"}
        )
        assert r.status_code == 200, r.text


def test_templates_and_prompts_are_capped(built_index):
    """10,000 labels x 2,000 templates of "{}" fit in a small request: refused before anything is encoded."""
    with make_client(built_index[0], max_templates=50, max_prompts=1_000) as client:
        image = b64(jpeg())
        r = client.post("/v1/classify", json={"images": [image], "labels": ["red"], "templates": ["{}"] * 51})
        assert r.status_code == 422 and "too many templates: 51 > 50" in r.json()["detail"]
        labels = [f"c{i}" for i in range(101)]
        r = client.post("/v1/classify", json={"images": [image], "labels": labels, "templates": ["a {}"] * 10})
        assert r.status_code == 422 and "101 x 10 prompts" in r.json()["detail"]
        r = client.put("/v1/label-sets/big", json={"labels": labels, "templates": ["a {}"] * 10})
        assert r.status_code == 422 and "over the limit of 1,000" in r.json()["detail"]
        r = client.post("/v1/classify", json={"images": [image], "labels": labels[:100], "templates": ["a {}"] * 10})
        assert r.status_code == 200, r.text
