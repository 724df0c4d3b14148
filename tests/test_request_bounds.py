"""Bounded cost for anonymous requests (issue 28, first part): bodies counted as they arrive, templates capped."""

from __future__ import annotations

import io
import json

from PIL import Image

from asif.encoders.images import decoded_pixels, open_image
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


def _image_bytes(size: tuple[int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 40, 200)).save(buf, format=fmt)
    return buf.getvalue()


def test_large_images_are_shrunk_while_decoding_and_small_ones_left_alone():
    jpeg_big, png_big = _image_bytes((3000, 2400), "JPEG"), _image_bytes((6000, 5000), "PNG")
    small = _image_bytes((1000, 800), "JPEG")
    assert open_image(small, shrink_to=1024).size == (1000, 800)  # as decoded without shrinking
    assert open_image(jpeg_big, shrink_to=1024).size == (1500, 1200)  # JPEG draft at 1/2: short side >= 1024
    assert decoded_pixels(jpeg_big, 1024) == 1500 * 1200 and decoded_pixels(small, 1024) == 1000 * 800
    assert open_image(png_big, shrink_to=1024).size == (1500, 1250)  # decoded whole, then reduced by 4
    assert open_image(jpeg_big).size == (3000, 2400)  # the builder and eval decode as before


def test_a_request_whose_images_decode_to_too_many_pixels_is_refused(built_index):
    with make_client(built_index[0], max_request_pixels=2_000_000) as client:
        big = b64(_image_bytes((1500, 1000), "PNG"))  # 1.5 Mpx each
        r = client.post("/v1/classify", json={"images": [big], "labels": ["red", "blue"]})
        assert r.status_code == 200, r.text
        r = client.post("/v1/classify", json={"images": [big, big], "labels": ["red", "blue"]})
        assert r.status_code == 413 and "decode to 3,000,000 pixels" in r.json()["detail"], r.text
        # A large JPEG counts at the scale it is decoded at: 4000 x 3000 decodes at 1/2 (6 Mpx -> 2000 x 1500).
        with make_client(built_index[0], max_request_pixels=3_100_000) as other:
            r = other.post("/v1/classify", json={"images": [b64(_image_bytes((4000, 3000), "JPEG"))], "labels": ["x"]})
            assert r.status_code == 200, r.text


def test_the_server_warns_when_writes_are_open(built_index, caplog):
    with caplog.at_level("WARNING", logger="asif.app"), make_client(built_index[0]):
        pass
    assert any("ASIF_API_KEY is not set" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="asif.app"), make_client(built_index[0], api_key="s3cret"):
        pass
    assert not any("ASIF_API_KEY" in r.getMessage() for r in caplog.records)
