"""A request that cannot be served in time answers 503 with a message (nothing stored) instead of hanging."""

from __future__ import annotations

import pytest

from service.images import encode_png_base64
from tests.support.payloads import H, item_payload


@pytest.mark.slow
def test_requests_past_their_deadline_answer_503_and_store_nothing(make_server, tiny_test, split):
    q_idx, g_idx = split
    server = make_server(GRACEFUL_REQUEST_TIMEOUT_S="0.000001").start()
    c = server.client
    r = c.post("/v1/items", json={"items": item_payload(tiny_test, g_idx[:3])}, headers=H)
    assert r.status_code == 503, r.text
    assert "nothing was done" in r.json()["detail"]
    assert c.get(f"/v1/items/g{g_idx[0]}").status_code == 404
    r = c.post("/v1/search", json={"image_base64": encode_png_base64(tiny_test.images[q_idx[0]])})
    assert r.status_code == 503 and "GRACEFUL_REQUEST_TIMEOUT_S" in r.json()["detail"]
    server.stop()
    server = make_server(GRACEFUL_REQUEST_TIMEOUT_S="30").start()  # the same data with a sane deadline
    assert (
        server.client.post(
            "/v1/items", json={"items": item_payload(tiny_test, g_idx[:3])}, headers=H
        ).status_code
        == 200
    )
