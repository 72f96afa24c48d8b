"""Backfill jobs against a real server: while searching, across kill -9, under control, into another space."""

from __future__ import annotations

import base64
import hashlib
import threading
import time

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from index import Gallery
from index.db import make_engine
from index.tables import VEC_ID_COUNTER, BackfillJob, Counter, Embedding
from service.console.backfill import backfill_main
from service.images import encode_png_base64
from tests.service.conftest import API_KEY, item_payload
from trainer.artifact import embed_images, load_model

H = {"X-API-Key": API_KEY}


def _ingest(c: httpx.Client, ds, idx, batch: int = 80) -> list[dict]:
    payload = item_payload(ds, idx)
    for s in range(0, len(payload), batch):
        r = c.post("/v1/items", json={"items": payload[s : s + batch]}, headers=H)
        assert r.status_code == 200, r.text
    return payload


def _job(c: httpx.Client, job_id: int) -> dict:
    r = c.get(f"/v1/backfill/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _wait(c: httpx.Client, job_id: int, until, timeout: float = 90.0, allow_failed: bool = False) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = _job(c, job_id)
        if until(job):
            return job
        assert allow_failed or job["status"] != "failed", job
        assert time.monotonic() < deadline, f"timed out waiting: {job}"
        time.sleep(0.05)


def _start(c: httpx.Client, **body) -> dict:
    r = c.post("/v1/backfill", json=body, headers=H)
    assert r.status_code == 202, r.text
    return r.json()


def _top_ids(c: httpx.Client, image, k: int) -> dict:
    r = c.post("/v1/search", json={"image_base64": encode_png_base64(image), "k": k, "include_metadata": False})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_backfill_completes_while_searches_continue(make_server, tiny_models, tiny_test, split, database_url,
                                                     tmp_path):
    q_idx, g_idx = split
    server = make_server().start()
    c = server.client
    _ingest(c, tiny_test, g_idx)
    assert c.post("/v1/models/v2/activate", headers=H).status_code == 200

    # The report's curve, simulated on the gallery's own labelled items, for both policies.
    rep = c.get("/v1/backfill/report", params={"candidate": "v2"}).json()
    curve = rep["curve"]
    assert curve["method"] == "simulated" and curve["sample"]["simulated"] == len(g_idx)
    for policy in ("sequential", "uncertainty"):
        pts = curve["policies"][policy]
        assert [p["fraction"] for p in pts] == [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
        assert [p["items"] for p in pts][-1] == len(g_idx) and pts[0]["seconds"] == 0
        assert all(a["seconds"] <= b["seconds"] for a, b in zip(pts, pts[1:], strict=False))
        assert all(0 <= p["quality"]["mAP"] <= 1 for p in pts)
    seq, unc = curve["policies"]["sequential"], curve["policies"]["uncertainty"]
    assert seq[0]["quality"] == unc[0]["quality"] and seq[-1]["quality"] == unc[-1]["quality"]
    assert rep["cannot_backfill"] == {"count": 0, "examples": []}

    queries = [encode_png_base64(tiny_test.images[i]) for i in q_idx[:10]]
    stop = threading.Event()
    failures: list[str] = []
    mixed_seen = []

    def searcher(n: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as hc:
            i = n
            while not stop.is_set():
                try:
                    r = hc.post("/v1/search", json={"image_base64": queries[i % len(queries)], "k": len(g_idx),
                                                    "include_metadata": False})
                    if r.status_code != 200 or len(r.json()["hits"]) != len(g_idx):
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        by = {h["embedded_by"] for h in r.json()["hits"]}
                        if by == {"v1", "v2"}:
                            mixed_seen.append(1)
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                i += 1

    threads = [threading.Thread(target=searcher, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    try:
        job = _start(c, candidate="v2", policy="sequential", batch_size=16, rate_limit=60)
        assert job["status"] in ("pending", "running") and job["total"] == len(g_idx)
        job = _wait(c, job["id"], lambda j: j["status"] == "done")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert mixed_seen, "no search saw the gallery mixed v1/v2 during the backfill"
    assert (job["done"], job["total"], job["skipped"], job["fraction"]) == (len(g_idx), len(g_idx), 0, 1.0)
    assert job["can_activate"] is True and job["reembedded"] == len(g_idx)

    # Searches now meet v2 embeddings only, and equal brute force of v2 over v2.
    v2 = load_model(tiny_models / "v2")
    gv = embed_images(v2, tiny_test.images[g_idx])
    for q in q_idx[:3]:
        body = _top_ids(c, tiny_test.images[q], 5)
        sims = (embed_images(v2, tiny_test.images[q : q + 1]) @ gv.T)[0]
        assert [h["external_id"] for h in body["hits"]] == [f"g{g_idx[j]}" for j in np.argsort(-sims, kind="stable")[:5]]
        assert {h["embedded_by"] for h in body["hits"]} == {"v2"}
    assert c.get(f"/v1/items/g{g_idx[0]}").json()["embedded_by"] == {"v1": "v2"}
    assert 'purpose="backfill"' in c.get("/metrics").text

    assert server.stop() == 0
    with Gallery.open(database_url, tmp_path / "data") as g:
        assert g.consistency("v1") == (len(g_idx), len(g_idx))
        assert g.counts_by_version() == {"v2": len(g_idx)}


@pytest.mark.slow
def test_kill_9_mid_job_then_resume_embeds_every_item_exactly_once(make_server, tiny_test, split, database_url,
                                                                    tmp_path):
    _, g_idx = split
    n = len(g_idx)
    server = make_server().start()
    c = server.client
    _ingest(c, tiny_test, g_idx)
    assert c.post("/v1/models/v2/activate", headers=H).status_code == 200
    job = _start(c, candidate="v2", policy="uncertainty", batch_size=8, rate_limit=40)
    _wait(c, job["id"], lambda j: j["done"] >= 40)
    server.kill()  # SIGKILL: no shutdown, whatever batch was in flight is lost or committed

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            status, done_at_kill = conn.execute(
                select(BackfillJob.status, BackfillJob.done).where(BackfillJob.id == job["id"])).one()
            versions = [v for (v,) in conn.execute(select(Embedding.version))]
        assert status == "running"
        assert 40 <= versions.count("v2") < n, "the kill came too late to interrupt the job"
    finally:
        engine.dispose()

    server = make_server().start()  # resumes the job left running
    # uncapped from here: batches are read ahead while the previous one is embedded and committed
    r = server.client.post(f"/v1/backfill/{job['id']}/resume", json={"rate_limit": 1e6}, headers=H)
    assert r.status_code == 200 and r.json()["status"] == "running"
    job = _wait(server.client, job["id"], lambda j: j["status"] == "done")
    assert (job["done"], job["total"], job["skipped"]) == (n, n, 0)
    assert job["reembedded"] <= n - done_at_kill + 8  # the new process did only what was left (and a lost batch)
    assert server.stop() == 0

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            counter = conn.execute(select(Counter.value).where(Counter.name == VEC_ID_COUNTER)).scalar_one()
            rows = conn.execute(select(Embedding.item_id, Embedding.version, Embedding.vec_id)
                                .order_by(Embedding.vec_id)).all()
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
        assert [r.item_id for r in rows] == g.backfill_order(job["id"])


@pytest.mark.slow
def test_pause_resume_cancel_skips_and_cli(make_server, tiny_test, split, tmp_path, monkeypatch, capsys,
                                           database_url):
    _, g_idx = split
    server = make_server().start()
    c = server.client
    payload = _ingest(c, tiny_test, g_idx)
    # Two items lose their kept source: a backfill must skip them, say so, and still finish.
    lost = [payload[3]["external_id"], payload[7]["external_id"]]
    for p in (payload[3], payload[7]):
        digest = hashlib.sha256(base64.b64decode(p["image_base64"])).hexdigest()
        (tmp_path / "data" / "blobs" / digest[:2] / digest).unlink()
    rep = c.get("/v1/backfill/report", params={"candidate": "v2"}).json()
    assert rep["cannot_backfill"]["count"] == 2
    assert {e["external_id"] for e in rep["cannot_backfill"]["examples"]} == set(lost)

    assert c.post("/v1/backfill", json={"candidate": "v2"}).status_code == 401
    for bad in ({"candidate": "v2", "policy": "random"}, {"candidate": "v2", "stop_at": 1.5},
                {"candidate": "v2", "rate_limit": 0}, {"candidate": "v2", "batch_size": 0}):
        assert c.post("/v1/backfill", json=bad, headers=H).status_code == 422, bad
    assert c.post("/v1/backfill", json={"candidate": "v9"}, headers=H).status_code == 404
    assert c.get("/v1/backfill/999").status_code == 404

    job = _start(c, candidate="v2", batch_size=4, rate_limit=20)
    jid = job["id"]
    r = c.post("/v1/backfill", json={"candidate": "v2"}, headers=H)
    assert r.status_code == 409 and f"job {jid}" in r.json()["detail"]
    _wait(c, jid, lambda j: j["done"] >= 8)
    assert c.post(f"/v1/backfill/{jid}/pause").status_code == 401
    r = c.post(f"/v1/backfill/{jid}/pause", headers=H)
    assert r.status_code == 200 and r.json()["status"] == "paused"
    time.sleep(0.6)  # a batch in flight when the pause came may still commit
    paused_at = _job(c, jid)["done"]
    time.sleep(1.0)
    assert _job(c, jid)["done"] == paused_at and _job(c, jid)["status"] == "paused"

    r = c.post(f"/v1/backfill/{jid}/resume", headers=H, json={"rate_limit": 40})
    assert r.status_code == 200 and r.json()["status"] == "running" and r.json()["rate_limit"] == 40
    _wait(c, jid, lambda j: j["done"] >= paused_at + 8)
    r = c.post(f"/v1/backfill/{jid}/cancel", headers=H)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    time.sleep(0.6)
    cancelled_at = _job(c, jid)["done"]
    time.sleep(0.6)
    assert _job(c, jid)["done"] == cancelled_at < len(g_idx)
    assert c.post(f"/v1/backfill/{jid}/resume", headers=H).status_code == 409
    assert c.post(f"/v1/backfill/{jid}/pause", headers=H).status_code == 409

    # The CLI starts a new job (what the cancelled one did stays done) and waits for it.
    monkeypatch.setenv("GRACEFUL_API_KEY", API_KEY)
    assert backfill_main(["start", "v2", "--api", server.url, "--policy", "uncertainty", "--batch-size", "8",
                          "--wait"]) == 0
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


@pytest.mark.slow
def test_other_space_candidate_is_activated_only_after_its_backfill(make_server, tiny_models, tiny_test, split,
                                                                    tmp_path):
    q_idx, g_idx = split
    server = make_server().start()
    c = server.client
    _ingest(c, tiny_test, g_idx)
    rep = c.get("/v1/backfill/report", params={"candidate": "v2-indep"}).json()
    assert rep["needs_backfill"] is True and rep["curve"]["serving_during_backfill"].startswith("the current model")
    pts = rep["curve"]["policies"]["sequential"]
    assert pts[0]["quality"] == pts[-2]["quality"]  # the old model serves until every item is re-embedded

    # A candidate whose weights cannot be read fails its job, with the reason; back in place, it resumes.
    weights = tmp_path / "models" / "v2-indep" / "weights.safetensors"
    weights.rename(weights.with_suffix(".away"))
    job = _start(c, candidate="v2-indep", policy="uncertainty", stop_at=0.5)
    job = _wait(c, job["id"], lambda j: j["status"] == "failed", allow_failed=True)
    assert "v2-indep" in job["error"] and job["done"] == 0
    weights.with_suffix(".away").rename(weights)
    assert c.post(f"/v1/backfill/{job['id']}/resume", json={"stop_at": 0.5}, headers=H).status_code == 200
    job = _wait(c, job["id"], lambda j: j["status"] == "paused")
    assert job["done"] == len(g_idx) // 2 and job["can_activate"] is False
    r = c.post("/v1/models/v2-indep/activate", headers=H)
    assert r.status_code == 409 and "backfill" in r.json()["detail"]
    body = _top_ids(c, tiny_test.images[q_idx[0]], 5)
    assert body["model_version"] == "v1" and {h["embedded_by"] for h in body["hits"]} == {"v1"}

    c.post(f"/v1/backfill/{job['id']}/resume", headers=H)
    job = _wait(c, job["id"], lambda j: j["status"] == "done")
    assert job["done"] == len(g_idx) and job["can_activate"] is True
    r = c.post("/v1/models/v2-indep/activate", headers=H)
    assert r.status_code == 200, r.text
    indep = load_model(tiny_models / "v2-indep")
    gv = embed_images(indep, tiny_test.images[g_idx])
    q = int(q_idx[1])
    body = _top_ids(c, tiny_test.images[q], 5)
    sims = (embed_images(indep, tiny_test.images[q : q + 1]) @ gv.T)[0]
    assert body["model_version"] == "v2-indep" and body["space"] == "v2-indep"
    assert [h["external_id"] for h in body["hits"]] == [f"g{g_idx[j]}" for j in np.argsort(-sims, kind="stable")[:5]]
    assert {h["embedded_by"] for h in body["hits"]} == {"v2-indep"}
    # The old space is untouched: rolling back to v1 works, and serves its v1 embeddings.
    assert c.post("/v1/models/rollback", headers=H).status_code == 200
    assert {h["embedded_by"] for h in _top_ids(c, tiny_test.images[q], 5)["hits"]} == {"v1"}
