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
    """(dataset, models): v1 (classes 0-4), v2 (BCT child of v1, all classes), v3 (BCT child of v2),
    v2-indep, brief (a BCT child of v1 that saw 40 images once: it writes into v1's space and is worse at
    it)."""
    from trainer.train import TrainConfig, train

    root = tmp_path_factory.mktemp("check")
    data = write_tiny_dataset(root / "data", per_class_train=200)
    common = dict(data=str(data), batch_size=64, threads=1)
    models = root / "models"
    train(TrainConfig(out=str(models / "v1"), classes="0-4", epochs=4, **common))
    train(TrainConfig(out=str(models / "v2"), old=str(models / "v1"), bct="full", epochs=6, **common))
    train(TrainConfig(out=str(models / "v2-indep"), seed=1, epochs=4, **common))
    # the third generation: a BCT child of v2 (for the chain's tests)
    train(TrainConfig(out=str(models / "v3"), old=str(models / "v2"), bct="full", epochs=4, **common))
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


def test_check_names_its_retrieval_flips(gallery_server):
    lab = gallery_server.client.post("/v1/models/v2/check", headers=H).json()["labelled"]
    flips = lab["retrieval_flips"]
    assert (flips["old_setting"], flips["new_setting"]) == ("v1/gallery", "v2/gallery")
    assert flips["n"] == lab["queries"]
    # the same figures as the labelled rates, with their counts
    assert flips["nfr"] == lab["negative_flip_rate"] and flips["pfr"] == lab["positive_flip_rate"]
    assert flips["n_negative"] == round(flips["nfr"] * flips["n"])
    assert flips["n_positive"] == round(flips["pfr"] * flips["n"])
    assert flips["top1_old"] == lab["active"]["top1"] and flips["top1_new"] == lab["candidate"]["top1"]
    # the first flipped queries by external id (gallery items: item_payload names them g<index>)
    listed = flips["flipped_negative"] + flips["flipped_positive"]
    assert len(flips["flipped_negative"]) == min(flips["n_negative"], flips["listed"])
    assert all(isinstance(e, str) and e.startswith("g") for e in listed)
    assert not set(flips["flipped_negative"]) & set(flips["flipped_positive"])


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
    first = report["ladder"][0]  # a BCT child: the cheapest rung is serving the stored vectors as they are
    assert first["route"] == "no_backfill" and first["quality"] == q["no_backfill"]
    assert report["ladder"][1] == {
        "route": "vector_transform",
        "available": False,
        "how": "same space: the candidate serves the stored vectors as they are",
    }


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


def _embed(models: Path, version: str, images):
    from trainer import embed_images, load_model

    return embed_images(load_model(models / version), images)


def test_a_chain_of_three_generations_serves_one_mixed_gallery(check_env, check_test, tmp_path):
    """v1 -> v2 -> v3, each a BCT child of the one before: each generation ingests a third of the gallery
    and is then replaced by the next through the guard; the newest searches items all three embedded."""
    import numpy as np

    test, (q_idx, g_idx) = check_test
    server = check_env().start()
    c = server.client
    thirds = np.array_split(np.asarray(g_idx), 3)
    for version, part in zip(("v1", "v2", "v3"), thirds, strict=True):
        if version != "v1":
            check = c.post(f"/v1/models/{version}/check", headers=H).json()
            parent = {"v2": ["v1"], "v3": ["v2", "v1"]}[version]
            assert check["method"] == "measured" and check["lineage"] == parent, check
            gens = check["gallery_generations"]
            assert all(g["in_lineage"] for g in gens.values())
            # every generation in the gallery so far is an ancestor of the candidate
            want = {"v2": {"v1": 1}, "v3": {"v1": 1, "v2": 2}}[version]
            assert {v: g["generation"] for v, g in gens.items()} == want, gens
            by_gen = check["labelled"].get("by_generation")
            if len(gens) > 1:
                assert set(by_gen) == set(gens) and by_gen["v1"]["gallery_items"] == len(thirds[0])
            r = c.post(f"/v1/models/{version}/activate", headers=H)
            assert r.status_code == 200, r.text  # the guard passes a true child over the mixed gallery
        body = item_payload(test, part.tolist())
        assert c.post("/v1/items", json={"items": body}, headers=H).status_code == 200

    listing = c.get("/v1/models").json()
    by_version = {m["version"]: m for m in listing["models"]}
    assert by_version["v3"]["lineage"] == ["v2", "v1"] and by_version["v3"]["generation"] == 3
    assert by_version["v2-indep"]["lineage"] == [] and by_version["v2-indep"]["generation"] == 1
    g = listing["gallery"]
    assert g["space"] == "v1" and g["items"] == len(g_idx)
    assert g["generations"] == {v: {"model": len(p)} for v, p in zip(("v1", "v2", "v3"), thirds, strict=True)}
    assert g["generation_of"] == {"v1": 1, "v2": 2, "v3": 3}

    # Search by the newest over the mixed gallery == brute force over each item's stored vector.
    models = tmp_path / "models"
    stored = np.concatenate(
        [_embed(models, v, test.images[p]) for v, p in zip(("v1", "v2", "v3"), thirds, strict=True)]
    )
    ids = [f"g{i}" for p in thirds for i in p.tolist()]
    made_by = {f"g{i}": v for v, p in zip(("v1", "v2", "v3"), thirds, strict=True) for i in p.tolist()}
    from service.images import encode_png_base64

    for q in q_idx[:8].tolist():
        r = c.post(
            "/v1/search",
            json={"image_base64": encode_png_base64(test.images[q]), "k": 10, "include_metadata": False},
        ).json()
        sims = (_embed(models, "v3", test.images[q : q + 1]) @ stored.T)[0]
        want = [ids[j] for j in np.argsort(-sims, kind="stable")[:10]]
        assert [h["external_id"] for h in r["hits"]] == want
        assert all(h["embedded_by"] == made_by[h["external_id"]] for h in r["hits"])

    # An independent model forged into the chain (space and parent of v3) is still refused, measured.
    _forge(models, "v2-indep", "forged", space="v1", compatible_with="v3")
    r = c.post("/v1/models/forged/activate", headers=H)
    assert r.status_code == 409 and r.json()["check"]["lineage"] == ["v3", "v2", "v1"]
    # Rolling back one generation works over the mixed gallery.
    assert c.post("/v1/models/rollback", headers=H).json()["active"] == "v2"


def test_the_report_ladder_orders_the_ways_to_serve_a_new_space(gallery_server, check_models, tmp_path):
    """v2-indep (its own space) over a labelled v1 gallery: no adapter yet, a fitted transform, then the
    image backfill and the full re-embed, cheapest first, each with quality and a predicted cost."""
    from trainer.transform import TransformConfig, fit_transform

    c = gallery_server.client
    models = tmp_path / "models"
    ladder = c.get("/v1/backfill/report", params={"candidate": "v2-indep"}).json()["ladder"]
    assert [r["route"] for r in ladder] == [
        "query_adapter",
        "vector_transform",
        "image_backfill",
        "full_reembed",
    ]
    assert ladder[0]["available"] is False and "graceful adapt" in ladder[0]["how"]
    assert ladder[1]["available"] is False and "graceful transform" in ladder[1]["how"]

    fit_transform(
        TransformConfig(old=str(models / "v1"), new=str(models / "v2-indep"), data=str(check_models[0]))
    )
    report = c.get("/v1/backfill/report", params={"candidate": "v2-indep"}).json()
    t, image, full = report["ladder"][1:]
    assert t["available"] is True and t["source"] == "v1" and t["items"] == report["items_total"]
    assert t["items_per_second"] > 0 and t["predicted"]["seconds"] > 0
    assert set(t["quality"]) == {"top1", "top5", "mAP"}
    # mapping stored vectors costs far less than re-embedding their images
    assert t["predicted"]["seconds"] < full["predicted"]["seconds"]
    assert full["quality"] == report["quality"]["full_backfill"]
    assert image["serving"].startswith("the candidate over the transformed gallery")
    uncertain = image["by_policy"]["uncertainty"]
    assert [p["fraction"] for p in uncertain] == sorted(p["fraction"] for p in uncertain)
    # the transform is the 0% point of the image backfill that follows it; re-embedding moves quality on
    assert uncertain[-1]["quality"]["mAP"] >= t["quality"]["mAP"] - 0.05
