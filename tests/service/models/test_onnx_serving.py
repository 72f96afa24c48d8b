"""An ONNX version served: a gallery founded by it (ingest and search through onnxruntime) answers as the
torch model it was exported from; a hostile ONNX folder is listed as invalid and never activated."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from service.console.cli import main
from service.images import encode_png_base64
from tests.support.onnx_models import REGISTER_ARGS, export_model, linear_graph
from tests.support.payloads import H, item_payload
from trainer.artifact import embed_images, load_model

pytestmark = pytest.mark.slow  # trains nothing, but registers two exports and serves: about 6 s


def _register(onnx_file, out, tiny_data) -> None:
    args = ["register-onnx", str(onnx_file), "--out", str(out), *REGISTER_ARGS, "--classes", "0-4"]
    assert main([*args, "--data", str(tiny_data), "--threads", "1"]) == 0


def test_a_gallery_founded_by_an_onnx_version_answers_like_torch_v1(
    make_server, tiny_data, tiny_test, split, tmp_path
):
    models = tmp_path / "models"  # make_server's copy of the tiny models: v1, v2, v2-indep
    exported = export_model(models / "v1", tmp_path / "v1.onnx")
    _register(exported, models / "v1-onnx", tiny_data)
    _register(exported, models / "v1-onnx-again", tiny_data)
    # the same export again, its card saying it writes into v1-onnx's space (true: it is the same graph)
    again = json.loads((models / "v1-onnx-again" / "card.json").read_text())
    again.update(space="v1-onnx", compatible_with="v1-onnx")
    (models / "v1-onnx-again" / "card.json").write_text(json.dumps(again))
    # A hostile graph (a custom-domain operator) dropped in with a card that matches it byte for byte.
    shutil.copytree(models / "v1-onnx", models / "evil")
    evil = linear_graph(tmp_path / "evil.onnx", dim=128, op_domain="com.evil")
    shutil.copy(evil, models / "evil" / "model.onnx")
    card = json.loads((models / "evil" / "card.json").read_text())
    card.update(version="evil", space="evil", onnx_sha256=hashlib.sha256(evil.read_bytes()).hexdigest())
    card["arch"]["onnx_bytes"] = evil.stat().st_size
    (models / "evil" / "card.json").write_text(json.dumps(card))

    q_idx, g_idx = split
    server = make_server(GRACEFUL_ACTIVE_MODEL="v1-onnx", GRACEFUL_CHECK_SAMPLE="60").start()
    c = server.client
    r = c.post("/v1/items", json={"items": item_payload(tiny_test, g_idx[:120])}, headers=H)
    assert r.status_code == 200 and r.json()["model_version"] == "v1-onnx"

    listed = {m["version"]: m for m in c.get("/v1/models").json()["models"]}
    assert listed["v1-onnx"]["valid"] and listed["v1-onnx"]["space"] == "v1-onnx"
    assert not listed["evil"]["valid"] and "com.evil" in listed["evil"]["error"]
    assert c.post("/v1/models/evil/activate", headers=H).status_code != 200
    assert c.get("/v1/models/active").json()["version"] == "v1-onnx"

    # Each query's top-1 is the torch v1's over the same gallery (the export embeds as v1 does).
    v1 = load_model(models / "v1")
    gallery = embed_images(v1, tiny_test.images[g_idx[:120]])
    for q in q_idx[:15].tolist():
        body = c.post(
            "/v1/search", json={"image_base64": encode_png_base64(tiny_test.images[q]), "k": 3}
        ).json()
        assert body["model_version"] == "v1-onnx" and body["hits"][0]["embedded_by"] == "v1-onnx"
        sims = gallery @ embed_images(v1, tiny_test.images[q : q + 1])[0]
        assert body["hits"][0]["external_id"] == f"g{g_idx[int(np.argmax(sims))]}"
        assert abs(body["hits"][0]["score"] - float(sims.max())) < 1e-4

    # The measured check of an ONNX candidate: no random twin of its architecture, random vectors instead.
    r = c.post("/v1/models/v1-onnx-again/check", headers=H)
    assert r.status_code == 200, r.text
    check = r.json()
    assert check["method"] == "measured" and check["unlabelled"]["overlap_at_10"] == 1.0
    assert "random unit vectors" in check["unlabelled"]["baseline"]["what"]
