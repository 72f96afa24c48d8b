"""The transform backfill (``kind: transform``): a candidate of its own space written from the stored vectors,
no source read; activated over the transformed gallery; then moved to true embeddings by an image backfill."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index import Gallery
from tests.support import backfill_api as api
from tests.support.payloads import H
from trainer import embed_images, load_model, load_transform, transform_dir
from trainer.transform import TransformConfig, fit_transform


def _fit(models: Path, data: Path) -> Path:
    """An affine transform v1 -> v2-indep (closed form: fast), fitted on the tiny train split."""
    res = fit_transform(
        TransformConfig(old=str(models / "v1"), new=str(models / "v2-indep"), data=str(data), kind="affine")
    )
    return res.path


def _brute_force(queries: np.ndarray, gallery: np.ndarray, ids: list[str], k: int) -> list[list[str]]:
    sims = queries @ gallery.T
    return [[ids[j] for j in np.argsort(-row, kind="stable")[:k]] for row in sims]


def test_transform_job_writes_the_new_space_from_stored_vectors_without_sources(
    make_server, server_env, tiny_data, tiny_test, split, database_url, tmp_path
):
    q_idx, g_idx = split
    n = len(g_idx)
    models = Path(server_env["GRACEFUL_MODELS_DIR"])
    path = _fit(models, tiny_data)
    assert path == transform_dir(models / "v2-indep", "v1")
    # Sources are not kept: an image backfill could do nothing here, the transform needs none.
    server = make_server(GRACEFUL_KEEP_SOURCES="false").start()
    c = server.client
    api.ingest(c, tiny_test, g_idx)
    assert c.post("/v1/models/v2-indep/activate", headers=H).status_code == 409  # not in its space yet

    job = api.start(c, candidate="v2-indep", kind="transform")
    assert (job["kind"], job["source"], job["policy"]) == ("transform", "v1", "sequential")
    job = api.wait(c, job["id"], lambda j: j["status"] == "done")
    assert (job["done"], job["total"], job["skipped"]) == (n, n, 0)
    assert job["can_activate"] is True

    # The stored v2-indep vectors are the transform of the stored v1 vectors, item by item.
    tf = load_transform(path)
    with Gallery.open(database_url, tmp_path / "check-index") as g:
        ids1, _, v1 = g.space_embeddings("v1")
        ids2, versions, v2 = g.space_embeddings("v2-indep")
        assert set(versions) == {"v2-indep"}
        assert g.counts_in_space("v2-indep") == {"v2-indep": {"transform": n}}
        assert g.counts_in_space("v1") == {"v1": {"model": n}}
    order = np.argsort(ids1)
    assert np.array_equal(ids1[order], np.sort(ids2))
    np.testing.assert_allclose(v2[np.argsort(ids2)], tf.apply(v1[order]), atol=1e-5)

    r = c.post("/v1/models/v2-indep/activate", headers=H)
    assert r.status_code == 200, r.text
    indep = load_model(models / "v2-indep")
    ext = [f"g{i}" for i in np.asarray(g_idx)[np.argsort(ids1)]]  # item ids follow ingest order
    gallery = tf.apply(v1[order])
    for q in q_idx[:5].tolist():
        body = api.top_ids(c, tiny_test.images[q], 5)
        assert body["model_version"] == "v2-indep"
        qv = embed_images(indep, tiny_test.images[q : q + 1])
        assert [h["external_id"] for h in body["hits"]] == _brute_force(qv, gallery, ext, 5)[0]
        assert {(h["embedded_by"], h["route"]) for h in body["hits"]} == {("v2-indep", "transform")}

    # A second transform job has nothing left to do.
    again = api.start(c, candidate="v2-indep", kind="transform", source="v1")
    again = api.wait(c, again["id"], lambda j: j["status"] == "done")
    assert again["reembedded"] == 0 and again["done"] == n


@pytest.mark.slow
def test_transformed_items_move_to_true_embeddings_by_the_image_backfill(
    make_server, server_env, tiny_data, tiny_test, split
):
    q_idx, g_idx = split
    n = len(g_idx)
    models = Path(server_env["GRACEFUL_MODELS_DIR"])
    _fit(models, tiny_data)
    server = make_server().start()
    c = server.client
    api.ingest(c, tiny_test, g_idx)
    job = api.start(c, candidate="v2-indep", kind="transform")
    api.wait(c, job["id"], lambda j: j["status"] == "done")
    assert c.post("/v1/models/v2-indep/activate", headers=H).status_code == 200

    # The image backfill of the same candidate still has every item to do: transformed rows are not its own.
    rep = c.get("/v1/backfill/report", params={"candidate": "v2-indep"}).json()
    assert rep["items_to_reembed"] == n and rep["items_embedded_by_candidate"] == 0
    job = api.start(c, candidate="v2-indep", policy="uncertainty", stop_at=0.5)
    job = api.wait(c, job["id"], lambda j: j["status"] == "paused")
    assert job["kind"] == "image" and job["done"] == n // 2
    routes = {
        h["route"] for q in q_idx[:20].tolist() for h in api.top_ids(c, tiny_test.images[q], 10)["hits"]
    }
    assert routes == {"model", "transform"}  # a mixed gallery meanwhile, each hit says which route
    models_stats = c.get("/v1/models").json()
    assert models_stats["gallery"]["generations"]["v2-indep"] == {"model": n // 2, "transform": n - n // 2}

    c.post(f"/v1/backfill/{job['id']}/resume", headers=H)
    job = api.wait(c, job["id"], lambda j: j["status"] == "done")
    assert job["done"] == n
    indep = load_model(models / "v2-indep")
    gallery = embed_images(indep, tiny_test.images[g_idx])
    ext = [f"g{i}" for i in g_idx]
    q = int(q_idx[3])
    body = api.top_ids(c, tiny_test.images[q], 5)
    qv = embed_images(indep, tiny_test.images[q : q + 1])
    assert [h["external_id"] for h in body["hits"]] == _brute_force(qv, gallery, ext, 5)[0]
    assert {h["route"] for h in body["hits"]} == {"model"}


def test_transform_job_refuses_bad_requests_and_stores_nothing(
    make_server, server_env, tiny_data, tiny_test, split
):
    _, g_idx = split
    models = Path(server_env["GRACEFUL_MODELS_DIR"])
    server = make_server().start()
    c = server.client
    api.ingest(c, tiny_test, g_idx[:40])

    def refused(body: dict, status: int, words: str) -> None:
        r = c.post("/v1/backfill", json=body, headers=H)
        assert r.status_code == status, r.text
        assert words in r.json()["detail"], r.json()

    refused({"candidate": "v2-indep", "kind": "transform"}, 404, "graceful transform")  # none fitted yet
    refused({"candidate": "v2", "kind": "transform"}, 422, "share space")  # a BCT child: nothing to map
    refused({"candidate": "v2-indep", "kind": "transform", "source": "nope"}, 404, "nope")
    refused({"candidate": "v2-indep", "kind": "transform", "source": "v2-indep"}, 422, "not its own")
    refused({"candidate": "v2-indep", "source": "v1"}, 422, "kind transform")
    refused({"candidate": "v2-indep", "kind": "transform", "policy": "uncertainty"}, 422, "item-id order")
    refused({"candidate": "v2-indep", "kind": "sideways"}, 422, "kind")
    _fit(models, tiny_data)
    # A transform fitted on another build of the candidate maps into the wrong place: refused as stale.
    card = transform_dir(models / "v2-indep", "v1") / "transform.json"
    text = card.read_text()
    card.write_text(text.replace('"target_sha256": "', '"target_sha256": "0'))
    r = c.post("/v1/backfill", json={"candidate": "v2-indep", "kind": "transform"}, headers=H)
    assert r.status_code == 404, r.text
    assert c.get("/v1/backfill").json()["jobs"] == []
    card.write_text(text)
    job = api.start(c, candidate="v2-indep", kind="transform")
    assert api.wait(c, job["id"], lambda j: j["status"] == "done")["done"] == 40


def test_graceful_backfill_start_kind_transform(
    make_server, server_env, tiny_data, tiny_test, split, monkeypatch, capsys
):
    from service.console.backfill import backfill_main
    from service.console.client import GracefulClient
    from tests.support.payloads import API_KEY

    _, g_idx = split
    models = Path(server_env["GRACEFUL_MODELS_DIR"])
    _fit(models, tiny_data)
    server = make_server().start()
    api.ingest(server.client, tiny_test, g_idx[:50])
    monkeypatch.setenv("GRACEFUL_API_KEY", API_KEY)
    # the CLI's HTTP client talks to the in-process server (a TestClient is an httpx.Client)
    monkeypatch.setattr(GracefulClient, "http", property(lambda self: server.client))
    assert backfill_main(["start", "v2-indep", "--kind", "transform", "--source", "v1", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "v2-indep (transform from v1): done 50/50" in out
    assert backfill_main(["start", "v2", "--kind", "transform"]) == 1  # same space: nothing to map
    assert "share space" in capsys.readouterr().err
