"""Every bad input at the HTTP door gets a 4xx naming the problem, and nothing is stored."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from service.images import encode_png_base64
from tests.support.payloads import H, item_payload


def _png(size: int, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size), np.uint8)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
def test_bad_inputs_get_4xx_with_a_message_and_store_nothing(make_server, tiny_test, tmp_path):
    (tmp_path / "models" / "broken").mkdir()
    (tmp_path / "models" / "broken" / "card.json").write_text('{"version": "broken"}')
    server = make_server(
        GRACEFUL_MAX_BATCH_ITEMS="20",
        GRACEFUL_MAX_BODY_BYTES=str(200_000),
        GRACEFUL_IMAGE_STRICT_SIZE="true",  # the wrong-size cases below: strict mode refuses them
    ).start()
    c = server.client
    good = item_payload(tiny_test, [1, 2])
    assert c.post("/v1/items", json={"items": good}, headers=H).status_code == 200

    def item(eid, b64):
        return {"external_id": eid, "image_base64": b64}

    ok_img = encode_png_base64(tiny_test.images[3])
    cases = [
        # (what, method, path, kwargs, status, words in the message)
        (
            "undecodable image",
            "post",
            "/v1/items",
            {"json": {"items": [item("x1", base64.b64encode(b"junk").decode())]}},
            422,
            "not a decodable",
        ),
        (
            "not base64",
            "post",
            "/v1/items",
            {"json": {"items": [item("x2", "@@@")]}},
            422,
            "not valid base64",
        ),
        ("wrong size", "post", "/v1/items", {"json": {"items": [item("x3", _png(32))]}}, 422, "32x32"),
        ("gif", "post", "/v1/items", {"json": {"items": [item("x4", _png(28, "GIF"))]}}, 422, "GIF"),
        (
            "one bad among good",
            "post",
            "/v1/items",
            {"json": {"items": [item("x5", ok_img), item("x6", "@@")]}},
            422,
            "x6",
        ),
        ("empty batch", "post", "/v1/items", {"json": {"items": []}}, 422, "empty batch"),
        (
            "batch too large",
            "post",
            "/v1/items",
            {"json": {"items": [item(f"y{i}", ok_img) for i in range(21)]}},
            413,
            "limit of 20",
        ),
        (
            "oversize body",
            "post",
            "/v1/items",
            {"json": {"items": [item("x7", "A" * 300_000)]}},
            413,
            "exceeds the limit",
        ),
        (
            "dup in batch",
            "post",
            "/v1/items",
            {"json": {"items": [item("x8", ok_img), item("x8", ok_img)]}},
            422,
            "duplicate",
        ),
        ("dup existing", "post", "/v1/items", {"json": {"items": [item("g1", ok_img)]}}, 409, "already"),
        (
            "malformed json",
            "post",
            "/v1/items",
            {"content": b'{"items": [', "headers": {**H, "content-type": "application/json"}},
            422,
            "malformed JSON",
        ),
        ("wrong type", "post", "/v1/items", {"json": {"items": "nope"}}, 422, "items"),
        ("unknown field", "post", "/v1/items", {"json": {"items": [], "extra": 1}}, 422, "extra"),
        (
            "empty body",
            "post",
            "/v1/items",
            {"content": b"", "headers": {**H, "content-type": "application/json"}},
            422,
            "empty request body",
        ),
        (
            "bad multipart image",
            "post",
            "/v1/items",
            {"files": [("files", ("z1.png", b"junk", "image/png"))]},
            422,
            "z1",
        ),
        ("k zero", "post", "/v1/search", {"json": {"image_base64": ok_img, "k": 0}}, 422, "k"),
        (
            "k huge",
            "post",
            "/v1/search",
            {"json": {"image_base64": ok_img, "k": 100_000}},
            422,
            "between 1 and",
        ),
        ("no query", "post", "/v1/search", {"json": {"k": 3}}, 422, "exactly one"),
        (
            "two queries",
            "post",
            "/v1/search",
            {"json": {"image_base64": ok_img, "item_id": "g1"}},
            422,
            "exactly one",
        ),
        ("vector w/o version", "post", "/v1/search", {"json": {"vector": [0.1] * 128}}, 422, "model_version"),
        (
            "unknown version",
            "post",
            "/v1/search",
            {"json": {"vector": [0.1] * 128, "model_version": "v9"}},
            404,
            "v9",
        ),
        (
            "wrong dim",
            "post",
            "/v1/search",
            {"json": {"vector": [0.1] * 7, "model_version": "v1"}},
            422,
            "dim 7",
        ),
        (
            "nan vector",
            "post",
            "/v1/search",
            {
                "content": json.dumps({"vector": [float("nan")] * 128, "model_version": "v1"}).encode(),
                "headers": {"content-type": "application/json"},
            },
            422,
            "NaN",
        ),
        ("unknown item", "post", "/v1/search", {"json": {"item_id": "nope"}}, 404, "nope"),
        ("bad search image", "post", "/v1/search", {"json": {"image_base64": _png(14)}}, 422, "14x14"),
        ("activate unknown", "post", "/v1/models/v9/activate", {}, 404, "v9"),
        ("activate broken", "post", "/v1/models/broken/activate", {}, 422, "card"),
        ("delete unknown", "delete", "/v1/items/nope", {}, 404, "nope"),
        ("report unknown", "get", "/v1/backfill/report?candidate=v9", {}, 404, "v9"),
        ("unknown route", "get", "/v1/nothing", {}, 404, "Not Found"),
    ]
    for what, method, path, kwargs, status, words in cases:
        kwargs.setdefault("headers", H)
        r = getattr(c, method)(path, **kwargs)
        assert r.status_code == status, (what, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and words.lower() in detail.lower(), (what, detail)

    # Nothing from a rejected request was stored.
    for eid in ["x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8", "y0", "z1"]:
        assert c.get(f"/v1/items/{eid}").status_code == 404, eid
    assert c.get("/v1/backfill/report?candidate=v1").json()["items_total"] == 2
    models = {m["version"]: m for m in c.get("/v1/models").json()["models"]}
    assert models["broken"]["valid"] is False and "card" in models["broken"]["error"]
