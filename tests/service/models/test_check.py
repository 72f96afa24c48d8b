"""The measured compatibility check: before activation, and as activation's guard.

These tests train their own models on a larger synthetic set (200 images a class): there a BCT child is
compatible for real, which the session's two-epoch tiny models are not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support.data import write_tiny_dataset
from tests.support.payloads import H, item_payload
from trainer.data import load_split, query_gallery_split

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def check_models(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, models): v1 (classes 0-4), v2 (BCT child of v1, all classes), v2-indep, brief (a BCT child
    of v1 that saw 40 images once: it writes into v1's space and is worse at it)."""
    from trainer.train import TrainConfig, train

    root = tmp_path_factory.mktemp("check")
    data = write_tiny_dataset(root / "data", per_class_train=200)
    common = dict(data=str(data), batch_size=64, threads=1)
    models = root / "models"
    train(TrainConfig(out=str(models / "v1"), classes="0-4", epochs=4, **common))
    train(TrainConfig(out=str(models / "v2"), old=str(models / "v1"), bct="full", epochs=6, **common))
    train(TrainConfig(out=str(models / "v2-indep"), seed=1, epochs=4, **common))
    train(
        TrainConfig(
            out=str(models / "brief"),
            old=str(models / "v1"),
            bct="full",
            epochs=1,
            limit=40,
            **{**common, "batch_size": 40},
        )
    )
    return data, models


def _forge(models: Path, source: str, name: str, **card_changes) -> None:
    """A copy of ``source`` whose card was edited by hand (its weights, and so their checksum, unchanged)."""
    shutil.copytree(models / source, models / name)
    card = json.loads((models / name / "card.json").read_text())
    card.update(version=name, **card_changes)
    (models / name / "card.json").write_text(json.dumps(card))


@pytest.fixture
def check_env(make_server, check_models, tmp_path):
    """make_server over a copy of the check's models, with the check on (its default sample)."""
    models = tmp_path / "models"
    shutil.rmtree(models)
    shutil.copytree(check_models[1], models)

    def make(**env: str):
        return make_server(GRACEFUL_CHECK_SAMPLE="300", **env)

    return make


@pytest.fixture
def check_test(check_models):
    test = load_split(check_models[0], "test")
    return test, query_gallery_split(len(test))


@pytest.fixture
def gallery_server(check_env, check_test):
    test, (_, g_idx) = check_test
    server = check_env().start()
    assert (
        server.client.post("/v1/items", json={"items": item_payload(test, g_idx)}, headers=H).status_code
        == 200
    )
    return server


def test_forged_card_is_refused_with_measured_figures_and_bct_child_accepted(gallery_server, tmp_path):
    c = gallery_server.client
    # an independent model whose card claims the gallery's space and parent
    _forge(tmp_path / "models", "v2-indep", "forged", space="v1", compatible_with="v1")
    r = c.post("/v1/models/forged/check", headers=H)
    assert r.status_code == 200, r.text
    forged = r.json()
    assert forged["method"] == "measured" and forged["passed"] is False
    assert forged["labelled"]["candidate"]["mAP"] < forged["labelled"]["active"]["mAP"]
    assert forged["sample"]["queries"] >= 20 and "baseline" in forged["unlabelled"]

    r = c.post("/v1/models/forged/activate", headers=H)
    assert r.status_code == 409, r.text
    body = r.json()
    assert "compatibility check" in body["detail"] and body["check"]["passed"] is False
    assert body["check"]["threshold"]["mAP"] == pytest.approx(
        body["check"]["labelled"]["active"]["mAP"] - 0.01, abs=1e-4
    )
    assert c.get("/v1/models/active").json()["version"] == "v1"  # nothing changed

    r = c.post("/v1/models/v2/activate", headers=H)  # the BCT child passes on its measured figures
    assert r.status_code == 200, r.text
    assert r.json()["check"]["passed"] is True and r.json()["check"]["method"] == "measured"
    assert r.json()["forced"] is False


def test_override_is_recorded_in_the_activation_history(gallery_server, tmp_path):
    c = gallery_server.client
    _forge(tmp_path / "models", "v2-indep", "forged", space="v1", compatible_with="v1")
    assert c.post("/v1/models/forged/activate", params={"force": "true"}).status_code == 401  # needs the key
    r = c.post("/v1/models/forged/activate", params={"force": "true"}, headers=H)
    assert r.status_code == 200, r.text
    assert r.json()["forced"] is True and r.json()["check"]["passed"] is False
    log = c.get("/v1/models/activations").json()["activations"]
    assert [(a["version"], a["forced"]) for a in log] == [("v1", False), ("forged", True)]
    assert log[-1]["check"]["passed"] is False


def test_compatible_but_worse_model_is_refused_on_the_labelled_criterion(gallery_server):
    c = gallery_server.client
    r = c.post("/v1/models/brief/check", headers=H).json()
    assert r["method"] == "measured" and r["passed"] is False, r
    assert r["labelled"]["candidate"]["mAP"] < r["labelled"]["active"]["mAP"] - 0.01
    assert c.post("/v1/models/brief/activate", headers=H).status_code == 409


def test_check_on_an_empty_gallery_or_without_sources_says_so(check_env, check_test):
    test, (_, g_idx) = check_test
    server = check_env(GRACEFUL_KEEP_SOURCES="false").start()
    c = server.client
    r = c.post("/v1/models/v2/check", headers=H).json()
    assert r["method"] == "card" and "empty" in r["reason"]
    assert c.post("/v1/items", json={"items": item_payload(test, g_idx[:30])}, headers=H).status_code == 200
    r = c.post("/v1/models/v2/check", headers=H).json()
    assert r["method"] == "card" and "no item of the gallery has a kept source" in r["reason"]
    assert c.post("/v1/models/v2/check", headers=H).json() == r  # cached per gallery state
    assert c.post("/v1/models/nope/check", headers=H).status_code == 404


def test_check_reports_the_three_way_class_split(gallery_server):
    r = gallery_server.client.post("/v1/models/v2/check", headers=H).json()
    split = r["labelled"]["by_class"]
    # v1 knows classes 0-4 and v2 0-9: every class of the gallery is old or new, none unseen
    assert set(split) == {"old", "new"}
    assert split["old"]["queries"] + split["new"]["queries"] == r["labelled"]["queries"]
    for part in split.values():
        assert set(part["active"]) == {"top1", "top5", "mAP"} and part["negative_flip_rate"] is not None


def test_without_labels_the_overlap_with_the_active_model_decides(check_env, check_test, tmp_path):
    test, (_, g_idx) = check_test
    server = check_env().start()
    c = server.client
    items = [{k: v for k, v in it.items() if k != "metadata"} for it in item_payload(test, g_idx)]
    assert c.post("/v1/items", json={"items": items}, headers=H).status_code == 200
    _forge(tmp_path / "models", "v2-indep", "forged", space="v1", compatible_with="v1")
    forged = c.post("/v1/models/forged/check", headers=H).json()
    child = c.post("/v1/models/v2/check", headers=H).json()
    assert "labelled" not in forged and "labelled" not in child
    assert forged["passed"] is False and child["passed"] is True, (forged, child)
    assert child["unlabelled"]["overlap_at_10"] > forged["unlabelled"]["overlap_at_10"]
    assert forged["unlabelled"]["overlap_at_10"] < forged["threshold"]["overlap_at_10"]


def test_the_backfill_report_takes_its_quality_from_the_gallery(gallery_server):
    c = gallery_server.client
    check = c.post("/v1/models/v2/check", headers=H).json()
    report = c.get("/v1/backfill/report", params={"candidate": "v2"}).json()
    q = report["quality"]
    assert q["source"].startswith("measured on this gallery")
    assert q["no_backfill"] == check["labelled"]["candidate"] and q["current"] == check["labelled"]["active"]
    assert report["curve"]["method"] == "simulated"
    assert q["full_backfill"] == report["curve"]["policies"]["sequential"][-1]["quality"]
    # the curve ranks against the whole gallery: its 0% point is the check's protocol on other queries
    assert report["curve"]["sample"]["gallery"] == check["sample"]["gallery"]


def test_graceful_check_prints_the_verdict(gallery_server, tmp_path, monkeypatch, capsys):
    from service.console.check import check_main
    from service.console.client import GracefulClient

    monkeypatch.setenv("GRACEFUL_API_KEY", "test-key")
    # the CLI's HTTP client talks to the in-process server (a TestClient is an httpx.Client)
    monkeypatch.setattr(GracefulClient, "http", property(lambda self: gallery_server.client))
    _forge(tmp_path / "models", "v2-indep", "forged", space="v1", compatible_with="v1")
    assert check_main(["v2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("v2: PASSES (measured)") and "overlap@10" in out and "candidate" in out
    assert check_main(["forged"]) == 1
    assert "FAILS" in capsys.readouterr().out
    assert check_main(["nope"]) == 1
    assert "HTTP 404" in capsys.readouterr().err
