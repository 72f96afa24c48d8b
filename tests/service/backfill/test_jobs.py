"""Backfill jobs against the app in-process: completing while searches continue, and a candidate of another
space activated only after its backfill."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest

from index import Gallery
from service.images import encode_png_base64
from tests.support import backfill_api as api
from tests.support.payloads import H
from trainer.artifact import embed_images, load_model


@pytest.mark.slow
def test_backfill_completes_while_searches_continue(
    make_server, tiny_models, tiny_test, split, database_url, tmp_path
):
    q_idx, g_idx = split
    server = make_server().start()
    c = server.client
    api.ingest(c, tiny_test, g_idx)
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
        with server.connect() as hc:
            i = n
            while not stop.is_set():
                try:
                    r = hc.post(
                        "/v1/search",
                        json={
                            "image_base64": queries[i % len(queries)],
                            "k": len(g_idx),
                            "include_metadata": False,
                        },
                    )
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
        job = api.start(c, candidate="v2", policy="sequential", batch_size=16, rate_limit=60)
        assert job["status"] in ("pending", "running") and job["total"] == len(g_idx)
        job = api.wait(c, job["id"], lambda j: j["status"] == "done")
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
        body = api.top_ids(c, tiny_test.images[q], 5)
        sims = (embed_images(v2, tiny_test.images[q : q + 1]) @ gv.T)[0]
        assert [h["external_id"] for h in body["hits"]] == [
            f"g{g_idx[j]}" for j in np.argsort(-sims, kind="stable")[:5]
        ]
        assert {h["embedded_by"] for h in body["hits"]} == {"v2"}
    assert c.get(f"/v1/items/g{g_idx[0]}").json()["embedded_by"] == {"v1": "v2"}
    assert 'purpose="backfill"' in c.get("/metrics").text

    assert server.stop() == 0
    with Gallery.open(database_url, tmp_path / "data") as g:
        assert g.consistency("v1") == (len(g_idx), len(g_idx))
        assert g.counts_by_version() == {"v2": len(g_idx)}


@pytest.mark.slow
def test_other_space_candidate_is_activated_only_after_its_backfill(
    make_server, tiny_models, tiny_test, split, tmp_path
):
    q_idx, g_idx = split
    server = make_server().start()
    c = server.client
    api.ingest(c, tiny_test, g_idx)
    rep = c.get("/v1/backfill/report", params={"candidate": "v2-indep"}).json()
    assert rep["needs_backfill"] is True and rep["curve"]["serving_during_backfill"].startswith(
        "the current model"
    )
    pts = rep["curve"]["policies"]["sequential"]
    assert pts[0]["quality"] == pts[-2]["quality"]  # the old model serves until every item is re-embedded

    # A candidate whose weights cannot be read fails its job, with the reason; back in place, it resumes.
    weights = tmp_path / "models" / "v2-indep" / "weights.safetensors"
    weights.rename(weights.with_suffix(".away"))
    job = api.start(c, candidate="v2-indep", policy="uncertainty", stop_at=0.5)
    job = api.wait(c, job["id"], lambda j: j["status"] == "failed", allow_failed=True)
    assert "v2-indep" in job["error"] and job["done"] == 0
    weights.with_suffix(".away").rename(weights)
    assert c.post(f"/v1/backfill/{job['id']}/resume", json={"stop_at": 0.5}, headers=H).status_code == 200
    job = api.wait(c, job["id"], lambda j: j["status"] == "paused")
    assert job["done"] == len(g_idx) // 2 and job["can_activate"] is False
    r = c.post("/v1/models/v2-indep/activate", headers=H)
    assert r.status_code == 409 and "backfill" in r.json()["detail"]
    body = api.top_ids(c, tiny_test.images[q_idx[0]], 5)
    assert body["model_version"] == "v1" and {h["embedded_by"] for h in body["hits"]} == {"v1"}

    c.post(f"/v1/backfill/{job['id']}/resume", headers=H)
    job = api.wait(c, job["id"], lambda j: j["status"] == "done")
    assert job["done"] == len(g_idx) and job["can_activate"] is True
    r = c.post("/v1/models/v2-indep/activate", headers=H)
    assert r.status_code == 200, r.text
    indep = load_model(tiny_models / "v2-indep")
    gv = embed_images(indep, tiny_test.images[g_idx])
    q = int(q_idx[1])
    body = api.top_ids(c, tiny_test.images[q], 5)
    sims = (embed_images(indep, tiny_test.images[q : q + 1]) @ gv.T)[0]
    assert body["model_version"] == "v2-indep" and body["space"] == "v2-indep"
    assert [h["external_id"] for h in body["hits"]] == [
        f"g{g_idx[j]}" for j in np.argsort(-sims, kind="stable")[:5]
    ]
    assert {h["embedded_by"] for h in body["hits"]} == {"v2-indep"}
    # The old space is untouched: rolling back to v1 works, and serves its v1 embeddings.
    assert c.post("/v1/models/rollback", headers=H).status_code == 200
    assert {h["embedded_by"] for h in api.top_ids(c, tiny_test.images[q], 5)["hits"]} == {"v1"}
