"""Metadata filters inside the search (index.filters, Gallery.search(filter=...)): exact against brute-force
numpy over the matching subset, at several selectivities, on SQLite and PostgreSQL, Flat and HNSW."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index import Gallery, IndexConfig, InvalidInput, NewItem, VersionInfo
from index import gallery as gallery_module
from index.filters import MAX_FILTER_KEYS, MAX_FILTER_VALUES, MetadataFilter
from tests.index._gallery_data import random_vectors

N, D = 400, 16
COLORS = ["red", "blue", "green", "black"]


def _metadata(i: int) -> Any:
    """Seeded, varied metadata: ints, strings, floats, bools, missing keys, look-alikes of other kinds."""
    if i % 97 == 0:
        return None
    meta: dict[str, Any] = {"label": i % 10, "color": COLORS[i % 4], "even": i % 2 == 0, "w": (i % 5) / 2}
    if i % 7 == 0:
        meta["label"] = str(i % 10)  # a string "3" is not the number 3
    if i % 11 == 0:
        meta["label"] = float(i % 10)  # 3.0 is the number 3
    if i % 13 == 0:
        meta["flag"] = 1  # not true
    elif i % 13 == 1:
        meta["flag"] = True
    if i % 17 == 0:
        meta["color"] = {"in": ["red"]}  # an object never matches
    if i % 19 == 0:
        meta['we"ird.key $[0]'] = "x"
    if i % 23 == 0:
        meta["unique"] = f"only-{i}"
    return meta


def _reference_match(meta: Any, spec: dict[str, Any]) -> bool:
    """The documented semantics, written independently of index.filters."""
    if not isinstance(meta, dict):
        return False
    for key, want in spec.items():
        values = want["in"] if isinstance(want, dict) else [want]
        if key not in meta:
            return False
        got = meta[key]

        def same(a: Any, b: Any) -> bool:
            if isinstance(a, bool) or isinstance(b, bool):
                return isinstance(a, bool) and isinstance(b, bool) and a == b
            if isinstance(a, str) or isinstance(b, str):
                return isinstance(a, str) and isinstance(b, str) and a == b
            return isinstance(a, int | float) and isinstance(b, int | float) and a == b

        if not any(same(got, v) for v in values):
            return False
    return True


@pytest.fixture
def data() -> tuple[np.ndarray, list[str], list[Any]]:
    vecs = random_vectors(N, D, seed=7)
    return vecs, [f"it{i:04d}" for i in range(N)], [_metadata(i) for i in range(N)]


def _fill(g: Gallery, data) -> None:
    vecs, ids, metas = data
    g.add([NewItem(e, v, metadata=m) for e, v, m in zip(ids, vecs, metas, strict=True)], version="v1")


@pytest.fixture
def filled(gallery: Gallery, data) -> Gallery:
    _fill(gallery, data)
    return gallery


@pytest.fixture
def hnsw(database_url: str, tmp_path: Path, data) -> Gallery:
    g = Gallery.open(database_url, tmp_path / "hnsw", config=IndexConfig(factory="HNSW32"))
    g.register_version(VersionInfo("v1", space="v1", embedding_dim=D))
    _fill(g, data)
    yield g
    g.close()


def _brute(
    data, queries: np.ndarray, k: int, spec: dict[str, Any], gone: set[str] = frozenset()
) -> list[list[str]]:
    vecs, ids, metas = data
    keep = np.array([_reference_match(m, spec) and e not in gone for e, m in zip(ids, metas, strict=True)])
    sub = vecs[keep]
    sub_ids = [e for e, k_ in zip(ids, keep, strict=True) if k_]
    if not sub_ids:
        return [[] for _ in queries]
    scores = queries.astype(np.float64) @ sub.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[sub_ids[j] for j in row] for row in order]


SPECS = [
    {"label": 3},  # ~10%, with look-alikes "3" (refused) and 3.0 (matched)
    {"label": {"in": [0, 1, 2, 3, 4]}},  # ~50%
    {"color": "red", "even": True},  # AND of two keys
    {"color": {"in": ["red", "blue", "green", "black"]}},  # ~all (objects and missing excluded)
    {"w": 1.5},  # floats
    {"label": "3"},  # strings only
    {"flag": True},  # booleans only (1 is not true)
    {"flag": 1},  # numbers only (true is not 1)
    {'we"ird.key $[0]': "x"},  # a key SQLite's JSON path cannot name
    {"unique": "only-46"},  # one item
    {"label": {"in": [3, "3", True]}},  # mixed kinds in one list
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: str(s)[:40])
def test_filtered_search_equals_brute_force_over_the_matching_subset(filled: Gallery, data, spec) -> None:
    queries = random_vectors(5, D, seed=11)
    n_match = sum(_reference_match(m, spec) for m in data[2])
    assert n_match > 0, spec
    for k in (1, 10, N):
        got = [[h.external_id for h in row] for row in filled.search("v1", queries, k, filter=spec)]
        assert got == _brute(data, queries, k, spec)
        assert all(len(row) == min(k, n_match) for row in got)  # k hits whenever k matching items exist


def test_scores_and_versions_match_an_unfiltered_search(filled: Gallery) -> None:
    q = random_vectors(1, D, seed=3)
    full = {h.external_id: h for h in filled.search("v1", q, N)[0]}
    for h in filled.search("v1", q, 20, filter={"color": "blue"})[0]:
        assert h.score == pytest.approx(full[h.external_id].score, abs=1e-6)
        assert h.embedded_by == "v1" and h.item_id == full[h.external_id].item_id


def test_k_larger_than_the_matches_returns_every_match(filled: Gallery, data) -> None:
    spec = {"unique": {"in": ["only-23", "only-46", "only-69", "nope"]}}
    hits = filled.search("v1", random_vectors(2, D, seed=5), 50, filter=spec)
    assert [sorted(h.external_id for h in row) for row in hits] == [["it0023", "it0046", "it0069"]] * 2


@pytest.mark.parametrize("spec", [{"label": 99}, {"nokey": 1}, {"label": "x"}, {"even": {"in": ["true"]}}])
def test_a_filter_matching_nothing_gives_empty_hits(filled: Gallery, spec) -> None:
    assert filled.search("v1", random_vectors(3, D, seed=1), 10, filter=spec) == [[], [], []]


def test_empty_filter_is_no_filter(filled: Gallery) -> None:
    q = random_vectors(2, D, seed=2)
    assert filled.search("v1", q, 5, filter={}) == filled.search("v1", q, 5)
    assert filled.search("v1", q, 5, filter=None) == filled.search("v1", q, 5)


def test_deleted_and_updated_items_follow_sql_at_once(filled: Gallery, data) -> None:
    q = random_vectors(2, D, seed=9)
    spec = {"label": 3}
    first = [h.external_id for h in filled.search("v1", q, 5, filter=spec)[0]]
    filled.delete(first[:2])
    got = [[h.external_id for h in row] for row in filled.search("v1", q, 5, filter=spec)]
    assert got == _brute(data, q, 5, spec, gone=set(first[:2]))
    # a metadata change is seen by the next filtered search (no vector changes)
    filled.update_metadata(first[2], {"label": 1234})
    assert [h.external_id for h in filled.search("v1", q, 5, filter={"label": 1234})[0]] == [first[2]]
    assert first[2] not in [h.external_id for h in filled.search("v1", q, N, filter=spec)[0]]


@pytest.mark.parametrize("through_faiss", [False, True], ids=["exact-from-sql", "hnsw-selector"])
@pytest.mark.parametrize(
    "spec", [{"label": 3}, {"unique": "only-46"}, {"color": {"in": COLORS}}], ids=["10%", "one", "~all"]
)
def test_hnsw_filtered_search_returns_k_hits_whenever_k_items_match(
    hnsw: Gallery, data, spec, through_faiss: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small matching sets are answered exactly from SQL; with that threshold at 0 every filter goes
    through HNSW with the selector (here, on a small graph, it still finds every match)."""
    if through_faiss:
        monkeypatch.setattr(gallery_module, "EXACT_FILTERED_MAX", 0)
    assert not hnsw.index_info("v1")["staging"] and hnsw.index_info("v1")["built_factory"] == "HNSW32"
    queries = random_vectors(4, D, seed=13)
    n_match = sum(_reference_match(m, spec) for m in data[2])
    for k in (1, 10, 60):
        got = [[h.external_id for h in row] for row in hnsw.search("v1", queries, k, filter=spec)]
        assert all(len(row) == min(k, n_match) for row in got)
        want = _brute(data, queries, k, spec)
        recall = np.mean([len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(got, want, strict=True)])
        assert recall >= (0.95 if through_faiss else 1.0)


def test_hnsw_tombstones_are_excluded_from_filtered_searches(
    hnsw: Gallery, data, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gallery_module, "EXACT_FILTERED_MAX", 0)  # through FAISS: allowed AND not tombstoned
    q = random_vectors(1, D, seed=21)
    spec = {"color": {"in": COLORS}}
    top = [h.external_id for h in hnsw.search("v1", q, 5, filter=spec)[0]]
    hnsw.delete(top[:3])
    assert hnsw.index_info("v1")["tombstones"] == 3
    got = [h.external_id for h in hnsw.search("v1", q, 30, filter=spec)[0]]
    assert len(got) == 30 and not set(top[:3]) & set(got)


def test_filter_of_the_faiss_selector_path_on_flat_with_tombstone_free_deletes(filled: Gallery) -> None:
    # Flat removes in place: the allowed set from SQL never names a removed vector
    filled.delete([f"it{i:04d}" for i in range(0, N, 2)])
    hits = filled.search("v1", random_vectors(1, D, seed=4), N, filter={"even": True})
    assert hits == [[]]  # every even item was deleted
    hits = filled.search("v1", random_vectors(1, D, seed=4), N, filter={"even": False})
    assert len(hits[0]) == sum(1 for i in range(1, N, 2) if _metadata(i) is not None)


# ---------------------------------------------------------------------------------------------- validation

BAD = [
    ("not an object", "a filter must be a JSON object"),
    ({"k": [1, 2]}, "must be a string, number or boolean"),
    ({"k": None}, "must be a string, number or boolean"),
    ({"k": {"a": 1}}, "an object must be"),
    ({"k": {"in": 3}}, "takes a list"),
    ({"k": {"in": []}}, "at least one value"),
    ({"k": {"in": [[1]]}}, "must be a string, number or boolean"),
    ({"k": {"in": [1], "eq": 2}}, "an object must be"),
    ({"k": float("nan")}, "finite"),
    ({"k": float("inf")}, "finite"),
    ({"k": 2**70}, "64 bits"),
    ({"": 1}, "1-128"),
    ({"x" * 129: 1}, "1-128"),
    ({"k\x00": 1}, "NUL"),
    ({"k": "a\x00"}, "NUL"),
    ({"k": "\udfff"}, "surrogate"),
    ({"k": "x" * 1025}, "longer than"),
    ({f"k{i}": 1 for i in range(MAX_FILTER_KEYS + 1)}, "keys, at most"),
    ({"k": {"in": list(range(MAX_FILTER_VALUES + 1))}}, "values, at most"),
    ({"a": {"in": list(range(200))}, "b": {"in": list(range(200))}}, "values in all"),
    ({1: 1}, "must be a string"),
]


@pytest.mark.parametrize(("spec", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_filters_are_refused_with_a_reason_and_nothing_searched(filled: Gallery, spec, message) -> None:
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[")):
        filled.search("v1", random_vectors(1, D), 3, filter=spec)


def test_metadata_filter_round_trips_and_is_hashable() -> None:
    f = MetadataFilter.parse({"label": 3, "color": {"in": ["red", "blue", "red"]}, "ok": True})
    assert f is not None
    assert MetadataFilter.parse(f.to_json()) == f
    assert f.to_json() == {"label": 3, "color": {"in": ["red", "blue"]}, "ok": True}  # repeats dropped
    assert hash(f) == hash(MetadataFilter.parse({"label": 3, "color": {"in": ["red", "blue"]}, "ok": True}))
    assert MetadataFilter.parse({"x": {"in": [1, 1.0, True]}}).conditions[0].values == (1, True)
    assert f.matches({"label": 3.0, "color": "blue", "ok": True})
    assert not f.matches({"label": 3, "color": "blue", "ok": 1})
    assert not f.matches(None) and not f.matches([1, 2])


def test_queries_an_approximate_index_answers_short_are_answered_exactly(
    hnsw: Gallery, data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever HNSW returns with the selector, a query short of min(k, matches) hits is redone exactly."""
    monkeypatch.setattr(gallery_module, "EXACT_FILTERED_MAX", 0)
    sidx = hnsw._space_index("v1")
    real = sidx.search
    monkeypatch.setattr(
        sidx,
        "search",
        lambda q, k, allowed=None, allows_all_at=None: [row[: k // 2] for row in real(q, k, allowed)],
    )
    queries = random_vectors(3, D, seed=17)
    spec = {"label": {"in": [1, 2]}}
    got = [[h.external_id for h in row] for row in hnsw.search("v1", queries, 10, filter=spec)]
    assert got == _brute(data, queries, 10, spec)


def test_matching_sets_are_reused_until_a_write_or_the_ttl(
    filled: Gallery, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One SQL query per filter while nothing changes; this object's writes are seen at once, another
    process's (another Gallery on the same database) within FILTER_CACHE_TTL_S."""
    calls: list[int] = []
    real = gallery_module.filters.matching_vec_ids
    monkeypatch.setattr(gallery_module.filters, "matching_vec_ids", lambda *a: calls.append(1) or real(*a))
    q = random_vectors(2, D, seed=8)
    first = filled.search("v1", q, 5, filter={"label": 4})
    assert filled.search("v1", q, 5, filter={"label": 4}) == first and len(calls) == 1
    filled.update_metadata(first[0][0].external_id, {"label": 5})  # this object's write: seen at once
    again = filled.search("v1", q, 5, filter={"label": 4})
    assert len(calls) == 2 and first[0][0].external_id not in [h.external_id for h in again[0]]

    monkeypatch.setattr(gallery_module, "FILTER_CACHE_TTL_S", 0.5)
    other = Gallery.open(database_url, tmp_path / "other")  # another process's view of the same database
    try:
        moved = again[0][0].external_id
        assert moved in [h.external_id for h in filled.search("v1", q, 5, filter={"label": 4})[0]]
        other.update_metadata(moved, {"label": 6})
        assert moved in [h.external_id for h in filled.search("v1", q, 5, filter={"label": 4})[0]]  # cached
        import time

        time.sleep(0.55)
        assert moved not in [h.external_id for h in filled.search("v1", q, 5, filter={"label": 4})[0]]
    finally:
        other.close()


@pytest.mark.parametrize("which", ["filled", "hnsw"])  # Flat through the selector, HNSW exact over the rows
@pytest.mark.parametrize("spec", SPECS[:4] + SPECS[8:9], ids=lambda s: str(s)[:40])
def test_databases_without_json_sql_filter_in_python_with_the_same_answers(
    request: pytest.FixtureRequest, database_url: str, which: str, data, spec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another database than SQLite/PostgreSQL: the items' metadata are read and matched in Python."""
    g = request.getfixturevalue(which)
    monkeypatch.setattr(gallery_module.filters, "sql_condition", lambda *a, **k: None)
    queries = random_vectors(3, D, seed=19)
    got = [[h.external_id for h in row] for row in g.search("v1", queries, 10, filter=spec)]
    assert got == _brute(data, queries, 10, spec)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_a_filter_matching_everything_is_the_plain_search_until_the_index_changes(
    database_url: str, tmp_path: Path, factory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gallery_module, "EXACT_FILTERED_MAX", 0)  # HNSW too through FAISS
    g = Gallery.open(database_url, tmp_path / "all", config=IndexConfig(factory=factory))
    try:
        g.register_version(VersionInfo("v1", space="v1", embedding_dim=D))
        vecs = random_vectors(300, D, seed=31)
        g.add([NewItem(f"a{i}", v, metadata={"all": True}) for i, v in enumerate(vecs)], "v1")
        q = random_vectors(3, D, seed=32)
        plain = g.search("v1", q, 10)
        assert g.search("v1", q, 10, filter={"all": True}) == plain
        assert (
            g._filter_cache[("v1", MetadataFilter.parse({"all": True}))].covers
            == g._space_index("v1").mutations
        )
        # a nearer item that does not match: the plain search finds it, the filtered one must not
        g.add([NewItem("odd", q[0], metadata={"all": False})], "v1")
        assert g.search("v1", q[:1], 1)[0][0].external_id == "odd"
        assert "odd" not in [h.external_id for h in g.search("v1", q[:1], 10, filter={"all": True})[0]]
        # the same, when the cached set is kept but the index changed behind it (mutations differ)
        monkeypatch.setattr(gallery_module, "FILTER_CACHE_TTL_S", 3600.0)
        g.search("v1", q[:1], 10, filter={"all": True})
        entry = g._filter_cache[("v1", MetadataFilter.parse({"all": True}))]
        g._space_index("v1").apply(None, np.array([10**9]), q[1:2].copy(), [(10**9, "ghost", "v1")])
        assert entry is g._filter_cache[("v1", MetadataFilter.parse({"all": True}))]
        got = [h.external_id for h in g.search("v1", q[1:2], 10, filter={"all": True})[0]]
        assert "ghost" not in got and len(got) == 10
    finally:
        g.close()


def test_small_matching_sets_of_an_approximate_index_never_walk_it(
    hnsw: Gallery, data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exact from the matching rows, without an HNSW walk first (a selective walk is the slow part)."""
    sidx = hnsw._space_index("v1")
    monkeypatch.setattr(sidx, "search", lambda *a, **k: pytest.fail("HNSW searched for a small matching set"))
    queries = random_vectors(2, D, seed=41)
    got = [[h.external_id for h in row] for row in hnsw.search("v1", queries, 10, filter={"label": 3})]
    assert got == _brute(data, queries, 10, {"label": 3})


def test_a_boolean_and_a_number_filter_are_different_filters(gallery: Gallery) -> None:
    # True == 1 in Python: the filters must still differ, in the cache of matching ids too
    assert MetadataFilter.parse({"a": True}) != MetadataFilter.parse({"a": 1})
    assert hash(MetadataFilter.parse({"a": True})) != hash(MetadataFilter.parse({"a": 1}))
    assert MetadataFilter.parse({"a": 1}) == MetadataFilter.parse({"a": 1.0})
    vecs = random_vectors(2, 8, seed=3)
    gallery.register_version(VersionInfo("v", space="v", embedding_dim=8))
    gallery.add(
        [NewItem("yes", vecs[0], metadata={"a": True}), NewItem("one", vecs[1], metadata={"a": 1})], "v"
    )
    for spec, want in (({"a": True}, "yes"), ({"a": 1}, "one"), ({"a": True}, "yes")):
        hits = gallery.search("v", vecs[:1], 5, filter=spec)[0]
        assert [h.external_id for h in hits] == [want], spec
