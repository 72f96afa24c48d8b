"""The story end to end against the app (create_app and its lifespan, in-process), across a restart over the
same data dir and database."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.payloads import H, item_payload
from trainer.artifact import embed_images, load_model


def _ingest(server, ds, idx, batch=50):
    for s in range(0, len(idx), batch):
        r = server.client.post("/v1/items", json={"items": item_payload(ds, idx[s : s + batch])}, headers=H)
        assert r.status_code == 200, r.text
        assert r.json()["count"] == len(idx[s : s + batch])


def _brute_topk(query_model, gallery_model, ds, q, g_idx, k):
    qv = embed_images(query_model, ds.images[q : q + 1])
    gv = embed_images(gallery_model, ds.images[g_idx])
    sims = (qv @ gv.T)[0]
    order = np.argsort(-sims, kind="stable")[:k]
    return [f"g{g_idx[j]}" for j in order], sims[order]


@pytest.mark.slow
def test_story_ingest_search_swap_refuse_rollback_restart(make_server, tiny_models, tiny_test, split):
    q_idx, g_idx = split
    server = make_server().start()
    c = server.client
    assert c.get("/readyz").json()["active_model"] == "v1"
    _ingest(server, tiny_test, g_idx)

    v1, v2 = load_model(tiny_models / "v1"), load_model(tiny_models / "v2")
    from service.images import encode_png_base64

    # Search by image with v1: equals brute force over the v1 gallery (Flat index: exact).
    q = int(q_idx[0])
    r = c.post("/v1/search", json={"image_base64": encode_png_base64(tiny_test.images[q]), "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "v1" and body["space"] == "v1"
    ids, scores = _brute_topk(v1, v1, tiny_test, q, g_idx, 5)
    assert [h["external_id"] for h in body["hits"]] == ids
    np.testing.assert_allclose([h["score"] for h in body["hits"]], scores, atol=1e-5)
    assert all(h["embedded_by"] == "v1" and "label" in h["metadata"] for h in body["hits"])

    # Hot swap to the BCT child: no backfill needed, nothing re-embedded.
    report = c.get("/v1/backfill/report", params={"candidate": "v2"}).json()
    assert report["needs_backfill"] is False and report["items_per_version"] == {"v1": len(g_idx)}
    r = c.post("/v1/models/v2/activate", headers=H)
    assert r.status_code == 200, r.text
    assert r.json()["active"] == "v2" and r.json()["previous"] == "v1" and "reembedded" not in r.json()
    body = c.post("/v1/search", json={"image_base64": encode_png_base64(tiny_test.images[q]), "k": 5}).json()
    assert body["model_version"] == "v2"
    ids, _ = _brute_topk(v2, v1, tiny_test, q, g_idx, 5)  # v2 queries over v1 embeddings
    assert [h["external_id"] for h in body["hits"]] == ids
    assert all(h["embedded_by"] == "v1" for h in body["hits"])
    assert c.get("/v1/backfill/report", params={"candidate": "v2"}).json()["items_per_version"] == {
        "v1": len(g_idx)
    }

    # The independent model is refused, says why and where the cost report is; nothing changes.
    r = c.post("/v1/models/v2-indep/activate", headers=H)
    assert r.status_code == 409
    assert "incompatible" in r.json()["detail"] and r.json()["backfill_report"].endswith("candidate=v2-indep")
    assert c.get("/v1/models/active").json()["version"] == "v2"
    report = c.get("/v1/backfill/report", params={"candidate": "v2-indep"}).json()
    assert report["needs_backfill"] is True and report["items_to_reembed"] == len(g_idx)
    assert report["throughput"]["images_per_second"] > 0 and report["predicted"]["cost"] >= 0
    assert report["quality"]["no_backfill"] is None and report["quality"]["full_backfill"]["mAP"] > 0

    # Search by vector of another space: refused the same way; by item id works.
    vec = embed_images(load_model(tiny_models / "v2-indep"), tiny_test.images[q : q + 1])[0].tolist()
    r = c.post("/v1/search", json={"vector": vec, "model_version": "v2-indep"})
    assert r.status_code == 409 and "not comparable" in r.json()["detail"]
    vec = embed_images(v1, tiny_test.images[q : q + 1])[0].tolist()
    r = c.post("/v1/search", json={"vector": vec, "model_version": "v1", "k": 3})
    assert r.status_code == 200 and r.json()["model_version"] == "v1"
    r = c.post("/v1/search", json={"item_id": f"g{g_idx[0]}", "k": 3})
    assert r.status_code == 200 and f"g{g_idx[0]}" not in [h["external_id"] for h in r.json()["hits"]]
    assert r.json()["model_version"] == "v1"  # the item's embedding was made by v1

    # Rollback, then restart: the persisted active version comes back.
    r = c.post("/v1/models/rollback", headers=H)
    assert r.status_code == 200 and r.json()["active"] == "v1"
    assert c.post("/v1/models/v2/activate", headers=H).status_code == 200
    assert server.stop() == 0
    server = make_server(GRACEFUL_ACTIVE_MODEL="v1").start()  # the persisted choice wins over the default
    assert server.client.get("/v1/models/active").json()["version"] == "v2"
    body = server.client.post(
        "/v1/search", json={"image_base64": encode_png_base64(tiny_test.images[q]), "k": 5}
    ).json()
    assert body["model_version"] == "v2" and len(body["hits"]) == 5
    models = {m["version"]: m for m in server.client.get("/v1/models").json()["models"]}
    assert models["v2"]["active"] and models["v2-indep"]["can_activate"] is False
    metrics = server.client.get("/metrics").text
    assert "graceful_requests_total" in metrics and f"graceful_gallery_items {float(len(g_idx))}" in metrics
