"""Backfill job control: pause, resume, cancel, items whose source is lost skipped with the reason, and the
`graceful backfill` CLI. On a real server (uvicorn in a child process): the CLI speaks HTTP to ``server.url``."""

from __future__ import annotations

import base64
import hashlib
import time

import pytest
from sqlalchemy import select

from index.db import make_engine
from index.tables import VEC_ID_COUNTER, Counter
from service.console.backfill import backfill_main
from tests.support import backfill_api as api
from tests.support.payloads import API_KEY, H


@pytest.mark.slow
def test_pause_resume_cancel_skips_and_cli(
    make_real_server, tiny_test, split, tmp_path, monkeypatch, capsys, database_url
):
    _, g_idx = split
    server = make_real_server().start()
    c = server.client
    payload = api.ingest(c, tiny_test, g_idx)
    # Two items lose their kept source: a backfill must skip them, say so, and still finish.
    lost = [payload[3]["external_id"], payload[7]["external_id"]]
    for p in (payload[3], payload[7]):
        digest = hashlib.sha256(base64.b64decode(p["image_base64"])).hexdigest()
        (tmp_path / "data" / "blobs" / digest[:2] / digest).unlink()
    rep = c.get("/v1/backfill/report", params={"candidate": "v2"}).json()
    assert rep["cannot_backfill"]["count"] == 2
    assert {e["external_id"] for e in rep["cannot_backfill"]["examples"]} == set(lost)

    assert c.post("/v1/backfill", json={"candidate": "v2"}).status_code == 401
    for bad in (
        {"candidate": "v2", "policy": "random"},
        {"candidate": "v2", "stop_at": 1.5},
        {"candidate": "v2", "rate_limit": 0},
        {"candidate": "v2", "batch_size": 0},
    ):
        assert c.post("/v1/backfill", json=bad, headers=H).status_code == 422, bad
    assert c.post("/v1/backfill", json={"candidate": "v9"}, headers=H).status_code == 404
    assert c.get("/v1/backfill/999").status_code == 404

    job = api.start(c, candidate="v2", batch_size=4, rate_limit=20)
    jid = job["id"]
    r = c.post("/v1/backfill", json={"candidate": "v2"}, headers=H)
    assert r.status_code == 409 and f"job {jid}" in r.json()["detail"]
    api.wait(c, jid, lambda j: j["done"] >= 8)
    assert c.post(f"/v1/backfill/{jid}/pause").status_code == 401
    r = c.post(f"/v1/backfill/{jid}/pause", headers=H)
    assert r.status_code == 200 and r.json()["status"] == "paused"
    time.sleep(0.6)  # a batch in flight when the pause came may still commit
    paused_at = api.job(c, jid)["done"]
    time.sleep(1.0)
    assert api.job(c, jid)["done"] == paused_at and api.job(c, jid)["status"] == "paused"

    r = c.post(f"/v1/backfill/{jid}/resume", headers=H, json={"rate_limit": 40})
    assert r.status_code == 200 and r.json()["status"] == "running" and r.json()["rate_limit"] == 40
    api.wait(c, jid, lambda j: j["done"] >= paused_at + 8)
    r = c.post(f"/v1/backfill/{jid}/cancel", headers=H)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    time.sleep(0.6)
    cancelled_at = api.job(c, jid)["done"]
    time.sleep(0.6)
    assert api.job(c, jid)["done"] == cancelled_at < len(g_idx)
    assert c.post(f"/v1/backfill/{jid}/resume", headers=H).status_code == 409
    assert c.post(f"/v1/backfill/{jid}/pause", headers=H).status_code == 409

    # The CLI starts a new job (what the cancelled one did stays done) and waits for it.
    monkeypatch.setenv("GRACEFUL_API_KEY", API_KEY)
    assert (
        backfill_main(
            ["start", "v2", "--api", server.url, "--policy", "uncertainty", "--batch-size", "8", "--wait"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "done" in out and f"{len(g_idx) - 2}/{len(g_idx)}" in out and "2 skipped" in out
    jobs = c.get("/v1/backfill").json()["jobs"]
    assert [j["status"] for j in jobs] == ["cancelled", "done"]
    last = jobs[-1]
    assert last["reembedded"] == len(g_idx) - 2 - cancelled_at  # nothing re-embedded twice
    assert last["skipped"] == 2 and {s["external_id"] for s in last["skipped_examples"]} == set(lost)
    assert all("not in the blob store" in s["reason"] for s in last["skipped_examples"])
    assert backfill_main(["status", str(last["id"]), "--api", server.url]) == 0
    assert f"job {last['id']} v2 (uncertainty): done" in capsys.readouterr().out
    assert backfill_main(["cancel", str(last["id"]), "--api", server.url]) == 1
    assert "nothing to cancel" in capsys.readouterr().err
    assert server.stop() == 0
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            counter = conn.execute(select(Counter.value).where(Counter.name == VEC_ID_COUNTER)).scalar_one()
    finally:
        engine.dispose()
    assert counter == len(g_idx) + len(g_idx) - 2  # one ingest per item, one re-embed per item with a source
