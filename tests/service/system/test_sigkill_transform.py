"""Fault: SIGKILL the server in the middle of a transform backfill, restart it on the same data: the job resumes
from its last commit and maps every item exactly once, with no item source kept anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from index.db import make_engine
from index.tables import VEC_ID_COUNTER, BackfillJob, Counter, Embedding
from tests.support import backfill_api as api
from tests.support.payloads import H
from trainer.transform import TransformConfig, fit_transform


@pytest.mark.slow
def test_kill_9_mid_transform_job_then_resume_maps_every_item_exactly_once(
    make_real_server, server_env, tiny_data, tiny_test, split, database_url
):
    _, g_idx = split
    n = len(g_idx)
    models = Path(server_env["GRACEFUL_MODELS_DIR"])
    fit_transform(
        TransformConfig(
            old=str(models / "v1"), new=str(models / "v2-indep"), data=str(tiny_data), kind="affine"
        )
    )
    server = make_real_server(GRACEFUL_KEEP_SOURCES="false").start()
    c = server.client
    api.ingest(c, tiny_test, g_idx)
    job = api.start(c, candidate="v2-indep", kind="transform", batch_size=8, rate_limit=40)
    api.wait(c, job["id"], lambda j: j["done"] >= 40)
    server.kill()  # SIGKILL: whatever batch was in flight is lost or committed, nothing in between

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            status, done_at_kill = conn.execute(
                select(BackfillJob.status, BackfillJob.done).where(BackfillJob.id == job["id"])
            ).one()
            mapped = conn.execute(select(Embedding.item_id).where(Embedding.space == "v2-indep")).all()
        assert status == "running"
        assert 40 <= len(mapped) < n, "the kill came too late to interrupt the job"
    finally:
        engine.dispose()

    server = make_real_server(GRACEFUL_KEEP_SOURCES="false").start()  # resumes the job left running
    r = server.client.post(f"/v1/backfill/{job['id']}/resume", json={"rate_limit": 1e6}, headers=H)
    assert r.status_code == 200 and r.json()["status"] == "running"
    job = api.wait(server.client, job["id"], lambda j: j["status"] == "done")
    assert (job["done"], job["total"], job["skipped"], job["kind"]) == (n, n, 0, "transform")
    assert job["reembedded"] <= n - done_at_kill + 8  # the new process did only what was left
    assert server.client.post("/v1/models/v2-indep/activate", headers=H).status_code == 200
    assert server.stop() == 0

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            counter = conn.execute(select(Counter.value).where(Counter.name == VEC_ID_COUNTER)).scalar_one()
            rows = conn.execute(
                select(Embedding.item_id, Embedding.version, Embedding.route, Embedding.vec_id)
                .where(Embedding.space == "v2-indep")
                .order_by(Embedding.vec_id)
            ).all()
            old = conn.execute(select(Embedding.route).where(Embedding.space == "v1")).all()
    finally:
        engine.dispose()
    # Every vector write takes a fresh vec_id: n ingests + n transforms; an item mapped twice (or a batch
    # committed twice) would push the counter past 2n.
    assert counter == 2 * n
    assert [r.vec_id for r in rows] == list(range(n + 1, 2 * n + 1))
    assert {(r.version, r.route) for r in rows} == {("v2-indep", "transform")}
    assert len({r.item_id for r in rows}) == n
    assert len(old) == n and {r.route for r in old} == {"model"}  # the old space is untouched
