"""Driving backfill jobs over HTTP (any httpx-compatible client: in-process or real)."""

from __future__ import annotations

import time

from service.images import encode_png_base64
from tests.support.payloads import H, item_payload


def ingest(c, ds, idx, batch: int = 80) -> list[dict]:
    payload = item_payload(ds, idx)
    for s in range(0, len(payload), batch):
        r = c.post("/v1/items", json={"items": payload[s : s + batch]}, headers=H)
        assert r.status_code == 200, r.text
    return payload


def job(c, job_id: int) -> dict:
    r = c.get(f"/v1/backfill/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def wait(c, job_id: int, until, timeout: float = 90.0, allow_failed: bool = False) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        j = job(c, job_id)
        if until(j):
            return j
        assert allow_failed or j["status"] != "failed", j
        assert time.monotonic() < deadline, f"timed out waiting: {j}"
        time.sleep(0.05)


def start(c, **body) -> dict:
    r = c.post("/v1/backfill", json=body, headers=H)
    assert r.status_code == 202, r.text
    return r.json()


def top_ids(c, image, k: int) -> dict:
    r = c.post(
        "/v1/search", json={"image_base64": encode_png_base64(image), "k": k, "include_metadata": False}
    )
    assert r.status_code == 200, r.text
    return r.json()
