"""Versions whose embeddings are computed outside graceful, over HTTP (in-process server): vectors in with
their version, searches by vector equal to brute-force numpy, every bad vector refused with nothing stored,
images refused while such a version is active, and the same guard and bookkeeping as images."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from service.console.client import GracefulClient
from service.images import encode_png_base64
from tests.support.payloads import API_KEY, H, item_payload
from trainer.artifact import embed_images, load_model, read_card
from trainer.external import register_external

DIM = 16
N = 200


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM))


def _items(vectors: np.ndarray, version: str = "ext", prefix: str = "x") -> list[dict]:
    return [
        {"external_id": f"{prefix}{i}", "vector": v.tolist(), "model_version": version, "metadata": {"i": i}}
        for i, v in enumerate(vectors)
    ]


def _png_bytes(image: np.ndarray) -> bytes:
    return base64.b64decode(encode_png_base64(image))


def _count(c) -> int:
    return len(c.get("/v1/items", params={"limit": 1000}).json()["items"])


@pytest.fixture
def models_dir(server_env) -> Path:
    models = Path(server_env["GRACEFUL_MODELS_DIR"])
    register_external(models / "ext", DIM)  # its own space "ext"
    v1 = read_card(models / "v1")
    register_external(models / "ext-v1", v1.embedding_dim, space="v1", compatible_with="v1")
    return models


@pytest.fixture
def ext_server(make_server, models_dir):
    return make_server(GRACEFUL_ACTIVE_MODEL="ext").start()


def _brute_force(
    gallery: np.ndarray, ids: list[str], query: np.ndarray, k: int
) -> tuple[list[str], np.ndarray]:
    scores = _unit(gallery) @ _unit(query[None])[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[i] for i in order], scores[order]


def test_vectors_in_and_search_by_vector_equals_brute_force(ext_server) -> None:
    c = ext_server.client
    models = {m["version"]: m for m in c.get("/v1/models").json()["models"]}
    assert models["ext"]["format"] == "external" and models["ext"]["active"]
    assert models["v1"]["format"] == "graceful-model/1"
    assert c.get("/v1/models/active").json()["card"]["format"] == "external"

    gallery = _vectors(N)
    for s in (0, N // 2):  # two requests, each all-or-nothing
        r = c.post("/v1/items", json={"items": _items(gallery)[s : s + N // 2]}, headers=H)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "model_version": "ext",
            "space": "ext",
            "stored": [f"x{i}" for i in range(s, s + N // 2)],
            "count": N // 2,
        }
    ids = [f"x{i}" for i in range(N)]
    for q in _vectors(5, seed=1):
        r = c.post("/v1/search", json={"vector": q.tolist(), "model_version": "ext", "k": 10})
        assert r.status_code == 200, r.text
        answer = r.json()
        want, scores = _brute_force(gallery, ids, q, 10)
        assert answer["model_version"] == "ext" and answer["space"] == "ext"
        assert [h["external_id"] for h in answer["hits"]] == want
        np.testing.assert_allclose([h["score"] for h in answer["hits"]], scores, atol=1e-5)
        assert {h["embedded_by"] for h in answer["hits"]} == {"ext"}
        assert answer["hits"][0]["metadata"] == {"i": int(want[0][1:])}
    # an item as the query: its stored (normalised) vector, itself left out
    r = c.post("/v1/search", json={"item_id": "x3", "k": 5}).json()
    want, _ = _brute_force(gallery, ids, gallery[3], 6)
    assert [h["external_id"] for h in r["hits"]] == want[1:]
    item = c.get("/v1/items/x3").json()
    assert item["embedded_by"] == {"ext": "ext"} and item["has_source"] is False


def test_the_client_ingests_vectors_in_batches(ext_server) -> None:
    client = GracefulClient(ext_server.url, api_key=API_KEY, http_client=ext_server.client)
    vectors = _vectors(30)
    answer = client.ingest_vectors([f"c{i}" for i in range(30)], vectors, "ext", batch_size=8)
    assert answer == {
        "model_version": "ext",
        "space": "ext",
        "stored": [f"c{i}" for i in range(30)],
        "count": 30,
    }
    hits = client.search(vector=vectors[7], model_version="ext", k=1)["hits"]
    assert hits[0]["external_id"] == "c7" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


def _nan_body(items: list[dict]) -> dict:
    return {
        "content": json.dumps({"items": items}).encode(),
        "headers": {**H, "content-type": "application/json"},
    }


def test_bad_vectors_are_refused_and_nothing_is_stored(ext_server) -> None:
    c = ext_server.client
    good = _items(_vectors(3))
    nan = [dict(good[0]), *good[1:]]
    nan[0]["vector"] = [float("nan")] + good[0]["vector"][1:]
    inf = [dict(good[0]), *good[1:]]
    inf[0]["vector"] = [float("inf")] + good[0]["vector"][1:]
    cases = [
        (
            "wrong dim",
            {"json": {"items": [*good[:2], {**good[2], "vector": [0.5] * (DIM - 1)}]}},
            422,
            "dim 15",
        ),
        ("NaN", _nan_body(nan), 422, "finite"),
        ("inf", _nan_body(inf), 422, "finite"),
        (
            "zero vector",
            {"json": {"items": [*good[:2], {**good[2], "vector": [0.0] * DIM}]}},
            422,
            "zero norm",
        ),
        ("a string", {"json": {"items": [{**good[0], "vector": ["1"] * DIM}]}}, 422, "valid number"),
        ("empty vector", {"json": {"items": [{**good[0], "vector": []}]}}, 422, "vector"),
        ("unknown version", {"json": {"items": _items(_vectors(2), "v9")}}, 404, "v9"),
        ("another space", {"json": {"items": _items(_vectors(2), "v1")}}, 409, "space 'v1'"),
        (
            "no version",
            {"json": {"items": [{k: v for k, v in good[0].items() if k != "model_version"}]}},
            422,
            "model_version",
        ),
        (
            "two versions",
            {"json": {"items": [good[0], {**good[1], "model_version": "ext-v1"}]}},
            422,
            "one model_version",
        ),
        (
            "image and vector",
            {
                "json": {
                    "items": [{**good[0], "image_base64": encode_png_base64(np.zeros((1, 28, 28), np.uint8))}]
                }
            },
            422,
            "exactly one",
        ),
        (
            "mixed request",
            {
                "json": {
                    "items": [
                        good[0],
                        {
                            "external_id": "img",
                            "image_base64": encode_png_base64(np.zeros((1, 28, 28), np.uint8)),
                        },
                    ]
                }
            },
            422,
            "not both",
        ),
        ("repeated id", {"json": {"items": [good[0], {**good[1], "external_id": "x0"}]}}, 422, "duplicate"),
    ]
    for what, kwargs, status, words in cases:
        kwargs.setdefault("headers", H)
        r = c.post("/v1/items", **kwargs)
        assert r.status_code == status, (what, r.status_code, r.text)
        assert words.lower() in r.json()["detail"].lower(), (what, r.json())
        assert _count(c) == 0, what
    r = c.post("/v1/items", json={"items": _items(_vectors(2), "v1")}, headers=H)
    assert r.json()["backfill_report"] == "/v1/backfill/report?candidate=v1"
    assert c.post("/v1/items", json={"items": _items(_vectors(1))}).status_code == 401  # the API key


def test_the_batch_bound_applies_to_vectors(make_server, models_dir) -> None:
    s = make_server(GRACEFUL_ACTIVE_MODEL="ext", GRACEFUL_MAX_BATCH_ITEMS="4").start()
    r = s.client.post("/v1/items", json={"items": _items(_vectors(5))}, headers=H)
    assert r.status_code == 413 and "limit of 4" in r.json()["detail"]
    assert _count(s.client) == 0


def test_images_are_refused_while_an_external_version_is_active(ext_server, tiny_test) -> None:
    c = ext_server.client
    png = encode_png_base64(tiny_test.images[0])
    refusals = [
        c.post("/v1/items", json={"items": [{"external_id": "a", "image_base64": png}]}, headers=H),
        c.post("/v1/items", files={"files": ("a.png", _png_bytes(tiny_test.images[0]))}, headers=H),
        c.post("/v1/search", json={"image_base64": png}),
        c.post("/v1/search", files={"image": ("q.png", _png_bytes(tiny_test.images[0]))}),
        c.post(
            "/v1/search/batch",
            json={"searches": [{"vector": [1.0] * DIM, "model_version": "ext"}, {"image_base64": png}]},
        ),
    ]
    for r in refusals:
        assert r.status_code == 409, r.text
        detail = r.json()["detail"]
        assert "ext is external" in detail and "send vectors, not images" in detail
    assert _count(c) == 0
    r = c.post("/v1/search/batch", json={"searches": [{"vector": [1.0] * DIM, "model_version": "ext"}] * 2})
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    # the image-only machinery says why it cannot run for an external version
    r = c.post("/v1/backfill", json={"candidate": "ext"}, headers=H)
    assert r.status_code == 409 and "a backfill re-embeds the gallery's images" in r.json()["detail"]
    r = c.post("/v1/models/v1/shadow", json={"fraction": 0.5}, headers=H)
    assert r.status_code == 409 and "ext is external" in r.json()["detail"]


def test_restart_keeps_the_items_and_delete_works(make_server, models_dir) -> None:
    s = make_server(GRACEFUL_ACTIVE_MODEL="ext").start()
    gallery = _vectors(40)
    assert s.client.post("/v1/items", json={"items": _items(gallery)}, headers=H).status_code == 200
    q = {"vector": _vectors(1, seed=3)[0].tolist(), "model_version": "ext", "k": 10}
    before = s.client.post("/v1/search", json=q).json()
    assert s.stop() == 0
    s2 = make_server(GRACEFUL_ACTIVE_MODEL="v1").start()  # the persisted activation wins over the setting
    c = s2.client
    assert c.get("/v1/models/active").json()["version"] == "ext"
    assert _count(c) == 40
    assert c.post("/v1/search", json=q).json() == before
    assert c.delete("/v1/items/x5", headers=H).status_code == 200
    assert c.get("/v1/items/x5").status_code == 404
    hits = c.post("/v1/search", json={**q, "k": 40}).json()["hits"]
    assert len(hits) == 39 and "x5" not in {h["external_id"] for h in hits}
    r = c.post("/v1/items/delete", json={"external_ids": ["x6", "nope"]}, headers=H).json()
    assert r == {"deleted": ["x6"], "missing": ["nope"]}
    assert _count(c) == 38


def test_an_external_version_serves_a_gallery_of_its_space(make_server, models_dir, tiny_test, split) -> None:
    """v1 founds the gallery from images; ext-v1 (the team's pipeline writing v1's space) takes over: its
    vectors search the v1 embeddings, vectors of v1 itself are still accepted, the bookkeeping counts both."""
    _, g_idx = split
    s = make_server(GRACEFUL_CHECK_SAMPLE="50").start()  # v1 active, the measured check on
    c = s.client
    assert (
        c.post("/v1/items", json={"items": item_payload(tiny_test, g_idx[:40])}, headers=H).status_code == 200
    )
    r = c.post("/v1/models/ext/activate", headers=H)  # its own space, over v1's items: refused
    assert r.status_code == 409 and "space 'ext'" in r.json()["detail"]
    image_top = c.post(
        "/v1/search", json={"image_base64": encode_png_base64(tiny_test.images[g_idx[3]]), "k": 5}
    )
    r = c.post("/v1/models/ext-v1/activate", headers=H)
    assert r.status_code == 200, r.text
    check = r.json()["check"]
    assert check["method"] == "card" and "ext-v1 is external" in check["reason"]

    # the team's pipeline computes v1's embeddings itself: here, v1 run locally
    v1 = load_model(Path(models_dir) / "v1")
    queries = embed_images(v1, tiny_test.images[g_idx[3:4]])
    r = c.post("/v1/search", json={"vector": queries[0].tolist(), "model_version": "ext-v1", "k": 5})
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "ext-v1" and r.json()["space"] == "v1"
    assert [h["external_id"] for h in r.json()["hits"]] == [
        h["external_id"] for h in image_top.json()["hits"]
    ]
    assert r.json()["hits"][0]["external_id"] == f"g{g_idx[3]}"
    assert (
        c.post("/v1/search", json={"image_base64": encode_png_base64(tiny_test.images[0])}).status_code == 409
    )

    new = embed_images(v1, tiny_test.images[g_idx[40:50]])
    r = c.post("/v1/items", json={"items": _items(new[:6], "ext-v1", "e")}, headers=H)
    assert r.status_code == 200 and r.json()["space"] == "v1", r.text
    r = c.post("/v1/items", json={"items": _items(new[6:], "v1", "w")}, headers=H)  # same space: accepted
    assert r.status_code == 200 and r.json()["model_version"] == "v1", r.text
    assert c.get("/v1/items/e0").json()["embedded_by"] == {"v1": "ext-v1"}

    report = c.get("/v1/backfill/report", params={"candidate": "v2"}).json()
    assert report["items_per_version"] == {"v1": 44, "ext-v1": 6}
    assert report["cannot_backfill"]["count"] == 10  # the vectors came without images
    ext_report = c.get("/v1/backfill/report", params={"candidate": "ext-v1"}).json()
    assert ext_report["items_per_version"] == {"v1": 44, "ext-v1": 6}
    assert ext_report["items_embedded_by_candidate"] == 6 and ext_report["throughput"] is None
    assert "graceful cannot re-embed the gallery with it" in ext_report["cannot_backfill"]["reason"]
    r = c.post("/v1/models/v2/check", headers=H).json()  # the active version cannot embed the sources
    assert r["method"] == "card" and "ext-v1 is external" in r["reason"]

    assert c.post("/v1/models/v1/activate", headers=H).status_code == 200  # back to images
    png = encode_png_base64(tiny_test.images[0])
    r = c.post("/v1/items", json={"items": [{"external_id": "again", "image_base64": png}]}, headers=H)
    assert r.status_code == 200 and r.json()["model_version"] == "v1"
