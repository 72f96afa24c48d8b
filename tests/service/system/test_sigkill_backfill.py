"""Fault: SIGKILL the server (a real uvicorn process) in the middle of a backfill job, restart it on the same data:
the job resumes, and every item is re-embedded exactly once, in the stored order."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from index import Gallery
from index.db import make_engine
from index.tables import VEC_ID_COUNTER, BackfillJob, Counter, Embedding
from tests.support import backfill_api as api
from tests.support.payloads import H


@pytest.mark.slow
def test_kill_9_mid_job_then_resume_embeds_every_item_exactly_once(
    make_real_server, tiny_test, split, database_url, tmp_path
):
    _, g_idx = split
    n = len(g_idx)
    server = make_real_server().start()
    c = server.client
    api.ingest(c, tiny_test, g_idx)
    assert c.post("/v1/models/v2/activate", headers=H).status_code == 200
    job = api.start(c, candidate="v2", policy="uncertainty", batch_size=8, rate_limit=40)
    api.wait(c, job["id"], lambda j: j["done"] >= 40)
    server.kill()  # SIGKILL: no shutdown, whatever batch was in flight is lost or committed

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            status, done_at_kill = conn.execute(
                select(BackfillJob.status, BackfillJob.done).where(BackfillJob.id == job["id"])
            ).one()
            versions = [v for (v,) in conn.execute(select(Embedding.version))]
        assert status == "running"
        assert 40 <= versions.count("v2") < n, "the kill came too late to interrupt the job"
    finally:
        engine.dispose()

    server = make_real_server().start()  # resumes the job left running
    # uncapped from here: batches are read ahead while the previous one is embedded and committed
    r = server.client.post(f"/v1/backfill/{job['id']}/resume", json={"rate_limit": 1e6}, headers=H)
    assert r.status_code == 200 and r.json()["status"] == "running"
    job = api.wait(server.client, job["id"], lambda j: j["status"] == "done")
    assert (job["done"], job["total"], job["skipped"]) == (n, n, 0)
    assert (
        job["reembedded"] <= n - done_at_kill + 8
    )  # the new process did only what was left (and a lost batch)
    assert server.stop() == 0

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            counter = conn.execute(select(Counter.value).where(Counter.name == VEC_ID_COUNTER)).scalar_one()
            rows = conn.execute(
                select(Embedding.item_id, Embedding.version, Embedding.vec_id).order_by(Embedding.vec_id)
            ).all()
    finally:
        engine.dispose()
    # Every vector write takes a fresh vec_id: n ingests + n re-embeds, so any item re-embedded twice
    # (or a batch committed twice) would push the counter past 2n.
    assert counter == 2 * n
    assert [r.vec_id for r in rows] == list(range(n + 1, 2 * n + 1))
    assert {r.version for r in rows} == {"v2"} and len({r.item_id for r in rows}) == n
    with Gallery.open(database_url, tmp_path / "data") as g:
        assert g.consistency("v1") == (n, n)
        # The resumed process followed the stored uncertainty order: re-embedding order == stored order.
        assert [r.item_id for r in rows] == g.backfill.order(job["id"])
