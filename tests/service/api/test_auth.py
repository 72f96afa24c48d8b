"""The API key: every mutating endpoint refuses a request without it (or with a wrong one), reads need none."""

from __future__ import annotations

import pytest

from service.images import encode_png_base64
from tests.support.payloads import item_payload


@pytest.mark.slow
def test_mutations_need_the_api_key(make_server, tiny_test):
    c = make_server().start().client
    payload = {"items": item_payload(tiny_test, [1])}
    for headers in ({}, {"X-API-Key": "wrong"}):
        for method, path, kw in [
            ("post", "/v1/items", {"json": payload}),
            ("delete", "/v1/items/g1", {}),
            ("post", "/v1/models/v2/activate", {}),
            ("post", "/v1/models/rollback", {}),
        ]:
            r = getattr(c, method)(path, headers=headers, **kw)
            assert r.status_code == 401, (method, path, r.text)
            assert "API key" in r.json()["detail"]
    assert c.get("/v1/items/g1").status_code == 404
    assert c.get("/v1/models/active").json()["version"] == "v1"
    # Reads need no key.
    assert (
        c.post("/v1/search", json={"image_base64": encode_png_base64(tiny_test.images[0])}).status_code == 200
    )
