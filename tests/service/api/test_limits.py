"""Request bodies are bounded even without a Content-Length (service/api/limits.py)."""

from __future__ import annotations

import pytest

from tests.support.payloads import H


@pytest.mark.slow
def test_body_limit_holds_without_content_length(make_server):
    server = make_server(GRACEFUL_MAX_BODY_BYTES="10000").start()

    def chunks():  # chunked transfer encoding: no Content-Length to check up front
        for _ in range(50):
            yield b"x" * 1000

    r = server.client.post("/v1/items", content=chunks(), headers={**H, "content-type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit of 10000" in r.json()["detail"]
    assert server.client.get("/healthz").status_code == 200
