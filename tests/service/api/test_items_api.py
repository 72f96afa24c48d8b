"""The search filters, batch search and item endpoints over HTTP (in-process server): filtered answers equal
the unfiltered ranking restricted to matching items; scrolling, batch get/delete and metadata patches do
what they say and refuse bad input with a 4xx that names it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from index.filters import MetadataFilter
from service.images import encode_png_base64
from service.serving.search import SearchJob, run_search_batch
from tests.support.payloads import H, item_payload

N_GALLERY = 60


@pytest.fixture
def server(make_server, tiny_test, split):
    _, g_idx = split
    s = make_server().start()
    payload = item_payload(tiny_test, g_idx[:N_GALLERY])
    for i, it in enumerate(payload):
        it["metadata"]["color"] = ["red", "blue", "green"][i % 3]
        it["metadata"]["even"] = i % 2 == 0
    r = s.client.post("/v1/items", json={"items": payload}, headers=H)
    assert r.status_code == 200, r.text
    s.meta = {it["external_id"]: it["metadata"] for it in payload}  # type: ignore[attr-defined]
    return s


def _ids(answer: dict) -> list[str]:
    return [h["external_id"] for h in answer["hits"]]


def _expected(server, body: dict, spec: dict, k: int) -> list[str]:
    """The unfiltered full ranking, restricted to the items matching ``spec``, cut to k."""
    full = server.client.post("/v1/search", json={**body, "k": N_GALLERY + 1}).json()
    flt = MetadataFilter.parse(spec)
    return [e for e in _ids(full) if flt.matches(server.meta[e])][:k]


def test_search_filters_by_image_vector_and_item(server, tiny_test, split) -> None:
    q_idx, g_idx = split
    img = {"image_base64": encode_png_base64(tiny_test.images[q_idx[0]])}
    vec_answer = server.client.post("/v1/search", json={"item_id": f"g{g_idx[5]}", "k": 1}).json()
    assert vec_answer["hits"]
    labels = sorted({m["label"] for m in server.meta.values()})
    specs = [
        {"label": labels[0]},
        {"color": {"in": ["red", "blue"]}, "even": True},
        {"label": {"in": labels[:3]}, "color": "green"},
        {"even": False},
    ]
    for spec in specs:
        for k in (1, 5, N_GALLERY):
            got = server.client.post("/v1/search", json={**img, "k": k, "filter": spec})
            assert got.status_code == 200, got.text
            want = _expected(server, img, spec, k)
            assert _ids(got.json()) == want and len(want) == min(
                k, sum(MetadataFilter.parse(spec).matches(m) for m in server.meta.values())
            )
            assert all(MetadataFilter.parse(spec).matches(h["metadata"]) for h in got.json()["hits"])
        item = {"item_id": f"g{g_idx[5]}"}
        got = server.client.post("/v1/search", json={**item, "k": 7, "filter": spec}).json()
        assert _ids(got) == [e for e in _expected(server, item, spec, 8) if e != f"g{g_idx[5]}"][:7]
    # by vector: the stored embedding of an item, with its version
    rec = server.app.state.parts.gallery.get_embedding(f"g{g_idx[7]}", "v1")
    body = {"vector": rec[0].tolist(), "model_version": "v1"}
    got = server.client.post("/v1/search", json={**body, "k": 5, "filter": {"color": "blue"}}).json()
    assert _ids(got) == _expected(server, body, {"color": "blue"}, 5)
    # nothing matches: no hits, not an error
    for spec in ({"label": 12345}, {"nokey": "x"}, {"even": "true"}):
        got = server.client.post("/v1/search", json={**img, "filter": spec})
        assert got.status_code == 200 and got.json()["hits"] == []


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"label": [1, 2]}, "filter"),
        ({"label": {"in": []}}, "filter"),
        ({"label": {"eq": 1}}, "filter"),
        ({"label": {"in": [1], "x": 2}}, "filter"),
        ({"label": None}, "filter"),
        ({f"k{i}": 1 for i in range(17)}, "filter"),
        ({"": 1}, "filter"),
        ({"k" * 129: 1}, "filter"),
        ({"label": "x" * 1025}, "filter"),
        ({"label": {"in": list(range(257))}}, "filter"),
        ({"a": {"in": list(range(200))}, "b": {"in": list(range(200))}}, "values in all"),
        ({"label\u0000": 1}, "NUL"),
        ({"label": "a\u0000"}, "NUL"),
        ("label=3", "filter"),
    ],
)
def test_bad_filters_get_422_naming_the_problem(server, tiny_test, split, spec, words) -> None:
    img = encode_png_base64(tiny_test.images[split[0][0]])
    r = server.client.post("/v1/search", json={"image_base64": img, "filter": spec})
    assert r.status_code == 422, r.text
    assert words in r.json()["detail"]


def test_non_finite_filter_values_get_422(server, split) -> None:
    for raw in (
        '{"item_id": "g%d", "filter": {"x": NaN}}',
        '{"item_id": "g%d", "filter": {"x": {"in": [Infinity]}}}',
    ):
        r = server.client.post(
            "/v1/search", content=(raw % split[1][0]).encode(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 422, r.text


def test_micro_batch_searches_each_filter_on_its_own(server, tiny_test, split) -> None:
    """run_search_batch: unfiltered jobs together, jobs of one filter together; each answer as if alone."""
    parts = server.app.state.parts
    active = parts.swap.require_active()
    q_idx, _ = split
    from service.images import decode_image

    def image(i: int) -> np.ndarray:
        raw = __import__("base64").b64decode(encode_png_base64(tiny_test.images[q_idx[i]]))
        return decode_image(raw, prep=active.prep, max_pixels=10**6, what="q")

    filters = [
        None,
        MetadataFilter.parse({"color": "red"}),
        None,
        MetadataFilter.parse({"even": True}),
        MetadataFilter.parse({"color": "red"}),
        MetadataFilter.parse({"color": {"in": ["nope"]}}),
    ]
    jobs = [
        SearchJob(image(i), k, True, f)
        for i, (k, f) in enumerate(zip([3, 9, 5, 4, 2, 6], filters, strict=True))
    ]
    together = run_search_batch(parts.gallery, active, jobs)
    for job, answer in zip(jobs, together, strict=True):
        alone = run_search_batch(parts.gallery, active, [job])[0]
        assert [h.external_id for h in answer.hits] == [h.external_id for h in alone.hits]
        assert len(answer.hits) == (
            0 if job.filter and job.filter.conditions[0].values == ("nope",) else job.k
        )
        if job.filter is not None:
            assert all(job.filter.matches(h.metadata) for h in answer.hits)


def test_batch_search_answers_each_search_in_order(server, tiny_test, split) -> None:
    q_idx, g_idx = split
    searches = [
        {
            "image_base64": encode_png_base64(tiny_test.images[q_idx[i]]),
            "k": 3 + i,
            **({"filter": {"color": "red"}} if i % 2 else {}),
        }
        for i in range(6)
    ] + [{"item_id": f"g{g_idx[2]}", "k": 4, "filter": {"even": True}}, {"item_id": f"g{g_idx[3]}", "k": 2}]
    r = server.client.post("/v1/search/batch", json={"searches": searches})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(searches)
    for body, answer in zip(searches, results, strict=True):
        alone = server.client.post("/v1/search", json=body).json()
        assert _ids(answer) == _ids(alone) and answer["model_version"] == alone["model_version"] == "v1"
    # bounds and bad members
    one = {"item_id": f"g{g_idx[2]}", "k": 1}
    for body, status, words in [
        ({"searches": []}, 422, "searches"),
        ({"searches": [one] * 65}, 422, "searches"),
        ({"searches": [one, {"k": 2}]}, 422, "exactly one"),
        ({"searches": [one, {**one, "filter": {"x": [1]}}]}, 422, "filter"),
        ({"searches": [one, {"item_id": "no-such-item"}]}, 404, "no-such-item"),
        ({"searches": [one], "extra": 1}, 422, "extra"),
        ({"searches": "x"}, 422, "searches"),
    ]:
        r = server.client.post("/v1/search/batch", json=body)
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["detail"], r.text
    assert server.client.post("/v1/search/batch", json={"searches": [one] * 64}).status_code == 200


def test_scroll_pages_through_every_item_once(server) -> None:
    seen: list[str] = []
    after = None
    while True:
        r = server.client.get("/v1/items", params={"limit": 7, **({"after": after} if after else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        seen += [it["external_id"] for it in page["items"]]
        assert all(it["embedded_by"] == {"v1": "v1"} and it["has_source"] for it in page["items"])
        if page["next"] is None:
            break
        assert page["next"] == page["items"][-1]["external_id"]
        after = page["next"]
    assert sorted(seen) == sorted(server.meta) and len(seen) == len(set(seen)) == N_GALLERY
    first = server.client.get("/v1/items").json()
    assert len(first["items"]) == N_GALLERY and first["next"] is None  # default limit 100
    for params in ({"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"after": ""}, {"after": "a\u0000"}):
        r = server.client.get("/v1/items", params=params)
        assert r.status_code == 422 and r.json()["detail"], (params, r.text)


def test_batch_get_and_delete_report_found_and_missing(server, tiny_test, split) -> None:
    _, g_idx = split
    a, b, c = (f"g{g_idx[i]}" for i in (1, 2, 3))
    r = server.client.post("/v1/items/get", json={"external_ids": [b, "nope", a, b]})
    assert r.status_code == 200, r.text
    assert [it["external_id"] for it in r.json()["items"]] == [b, a] and r.json()["missing"] == ["nope"]
    assert r.json()["items"][0]["metadata"] == server.meta[b]

    assert (
        server.client.post("/v1/items/delete", json={"external_ids": [a]}).status_code == 401
    )  # needs the key
    r = server.client.post("/v1/items/delete", json={"external_ids": [a, "nope", c, a]}, headers=H)
    assert r.status_code == 200, r.text
    assert r.json() == {"deleted": [a, c], "missing": ["nope"]}
    assert server.client.get(f"/v1/items/{a}").status_code == 404
    hits = server.client.post("/v1/search", json={"item_id": b, "k": N_GALLERY}).json()["hits"]
    assert {a, c}.isdisjoint(h["external_id"] for h in hits) and len(hits) == N_GALLERY - 3
    assert server.client.post("/v1/items/delete", json={"external_ids": [a]}, headers=H).json() == {
        "deleted": [],
        "missing": [a],
    }
    for body in (
        {"external_ids": []},
        {"external_ids": ["x"] * 1001},
        {"external_ids": [""]},
        {"ids": ["x"]},
        {"external_ids": ["a\u0000"]},
        {"external_ids": ["x" * 513]},
    ):
        for path, headers in (("/v1/items/get", {}), ("/v1/items/delete", H)):
            r = server.client.post(path, json=body, headers=headers)
            assert r.status_code == 422 and r.json()["detail"], (path, body, r.text)


def test_patch_metadata_merges_replaces_and_validates(server, tiny_test, split) -> None:
    _, g_idx = split
    a = f"g{g_idx[4]}"
    before = server.meta[a]
    assert server.client.patch(f"/v1/items/{a}", json={"metadata": {"x": 1}}).status_code == 401
    r = server.client.patch(f"/v1/items/{a}", json={"metadata": {"color": None, "shelf": "B2"}}, headers=H)
    assert r.status_code == 200, r.text
    assert r.json()["metadata"] == {"label": before["label"], "even": before["even"], "shelf": "B2"}
    assert server.client.get(f"/v1/items/{a}").json()["metadata"]["shelf"] == "B2"
    # a filter sees the new metadata at once
    hits = server.client.post(
        "/v1/search", json={"item_id": f"g{g_idx[0]}", "filter": {"shelf": "B2"}}
    ).json()["hits"]
    assert [h["external_id"] for h in hits] == [a] and hits[0]["metadata"]["shelf"] == "B2"
    r = server.client.patch(f"/v1/items/{a}", json={"metadata": {"only": [1, 2]}, "merge": False}, headers=H)
    assert r.status_code == 200 and r.json()["metadata"] == {"only": [1, 2]}
    r = server.client.patch(f"/v1/items/{a}", json={"metadata": None, "merge": False}, headers=H)
    assert r.status_code == 200 and r.json()["metadata"] is None

    deep: dict = {}
    node = deep
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    for body, status in [
        ({"metadata": deep}, 422),
        ({"metadata": {"k": "a\u0000"}}, 422),
        ({"metadata": {"k": "x" * 70_000}}, 422),
        ({"metadata": [1, 2]}, 422),
        ({"metadata": {}, "extra": 1}, 422),
        ({"merge": True}, 422),
    ]:
        r = server.client.patch(f"/v1/items/{a}", json=body, headers=H)
        assert r.status_code == status and r.json()["detail"], (str(body)[:80], r.text)
    r = server.client.patch(
        f"/v1/items/{a}",
        content=json.dumps({"metadata": {"v": float("nan")}}).encode(),
        headers={**H, "content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert server.client.get(f"/v1/items/{a}").json()["metadata"] is None  # nothing changed by the refusals
    r = server.client.patch("/v1/items/no-such-item", json={"metadata": {"a": 1}}, headers=H)
    assert r.status_code == 404 and "no-such-item" in r.json()["detail"]


def test_new_endpoints_are_in_the_openapi_document_with_bounded_bodies(server) -> None:
    spec = server.client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"get", "post"} <= set(paths["/v1/items"]) and "patch" in paths["/v1/items/{external_id}"]
    for path in ("/v1/items/get", "/v1/items/delete", "/v1/search/batch"):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "$ref" not in json.dumps(body) and body["type"] == "object", path
    ids = paths["/v1/items/get"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert ids["properties"]["external_ids"]["maxItems"] == 1000
    batch = paths["/v1/search/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert batch["properties"]["searches"]["maxItems"] == 64
    one = paths["/v1/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]["oneOf"][0]
    assert one["properties"]["filter"]["maxProperties"] == 16
    params = {p["name"]: p for p in paths["/v1/items"]["get"]["parameters"]}
    assert params["limit"]["schema"]["maximum"] == 1000
