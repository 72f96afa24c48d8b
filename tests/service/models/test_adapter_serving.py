"""An adapter version served as one compatible version: new model, then adapter, over a gallery of v1 embeddings."""

from __future__ import annotations

import json
import shutil

import numpy as np

from service.console.cli import main
from service.images import encode_png_base64
from tests.support.payloads import H, item_payload
from trainer.artifact import embed_images, load_model


def test_adapter_activates_with_no_backfill_and_answers_as_itself(
    make_server, tiny_data, tiny_test, split, tmp_path
):
    models = tmp_path / "models"  # make_server's copy of the tiny models: v1, v2 (BCT), v2-indep
    assert (
        main(
            [
                "adapt",
                "--new",
                str(models / "v2-indep"),
                "--old",
                str(models / "v1"),
                "--out",
                str(models / "v2-adapt"),
                "--kind",
                "affine",
                "--sample",
                "300",
                "--data",
                str(tiny_data),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    # An adapter whose new model's folder is not in the models dir.
    shutil.copytree(models / "v2-adapt", models / "orphan-adapt")
    card = json.loads((models / "orphan-adapt" / "card.json").read_text())
    (models / "orphan-adapt" / "card.json").write_text(
        json.dumps({**card, "version": "orphan-adapt", "adapter_of": "v2-gone"})
    )
    q_idx, g_idx = split
    server = make_server().start()
    c = server.client
    r = c.post("/v1/items", json={"items": item_payload(tiny_test, g_idx[:120])}, headers=H)
    assert r.status_code == 200 and r.json()["model_version"] == "v1"

    listed = {m["version"]: m for m in c.get("/v1/models").json()["models"]}
    assert listed["v2-adapt"]["valid"] and listed["v2-adapt"]["adapter_of"] == "v2-indep"
    assert listed["v2-adapt"]["space"] == "v1" and listed["v2-adapt"]["can_activate"]
    assert not listed["orphan-adapt"]["valid"] and "v2-gone" in listed["orphan-adapt"]["error"]
    assert (
        c.post("/v1/models/v2-indep/activate", headers=H).status_code == 409
    )  # the new model alone: refused

    r = c.post("/v1/models/v2-adapt/activate", headers=H)
    assert r.status_code == 200, r.text
    assert r.json()["active"] == "v2-adapt" and r.json()["space"] == "v1" and "reembedded" not in r.json()

    # A query is embedded by v2-indep then the adapter, and searches the v1 embeddings as they are.
    q = int(q_idx[0])
    body = c.post("/v1/search", json={"image_base64": encode_png_base64(tiny_test.images[q]), "k": 5}).json()
    assert body["model_version"] == "v2-adapt" and body["space"] == "v1"
    assert all(h["embedded_by"] == "v1" for h in body["hits"])
    adapter, v1 = load_model(models / "v2-adapt"), load_model(models / "v1")
    qv = embed_images(adapter, tiny_test.images[q : q + 1])[0]
    gv = embed_images(v1, tiny_test.images[g_idx[:120]])
    sims = gv @ qv
    order = np.argsort(-sims, kind="stable")[:5]
    assert [h["external_id"] for h in body["hits"]] == [f"g{g_idx[j]}" for j in order]
    np.testing.assert_allclose([h["score"] for h in body["hits"]], sims[order], atol=1e-4)

    report = c.get("/v1/backfill/report", params={"candidate": "v2-adapt"}).json()
    assert report["needs_backfill"] is False and report["items_to_reembed"] == 120

    r = c.post("/v1/models/orphan-adapt/activate", headers=H)
    assert r.status_code == 422 and "v2-gone" in r.json()["detail"] and "missing" in r.json()["detail"]
    assert c.get("/v1/models/active").json()["version"] == "v2-adapt"
