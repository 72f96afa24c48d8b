"""Gallery.scroll (external-id order, keyset pages), delete_many (deleted + missing) and update_metadata
(merge / replace, validated like an ingest), on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from index import Gallery, InvalidInput, ItemNotFound, NewItem
from index.errors import RepeatedIds
from tests.index._gallery_data import random_vectors

D = 16


@pytest.fixture
def filled(gallery: Gallery) -> Gallery:
    vecs = random_vectors(57, D, seed=1)
    gallery.add([NewItem(f"id-{i:03d}", v, metadata={"i": i, "tag": "t"}) for i, v in enumerate(vecs)], "v1")
    return gallery


def test_scroll_visits_every_item_once_in_order(filled: Gallery) -> None:
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = filled.scroll(after, limit=10)
        pages += 1
        seen += [r.external_id for r in page]
        if len(page) < 10:
            break
        after = page[-1].external_id
    assert seen == sorted(f"id-{i:03d}" for i in range(57)) and pages == 6
    first = filled.scroll(None, 3)
    assert [r.external_id for r in first] == ["id-000", "id-001", "id-002"]
    assert first[0].metadata == {"i": 0, "tag": "t"} and first[0].embedded_by == {"v1": "v1"}
    assert filled.scroll("id-056", 10) == [] and filled.scroll("zzz", 10) == []
    assert [r.external_id for r in filled.scroll("id-0305", 2)] == ["id-031", "id-032"]  # need not exist


def test_scroll_of_an_empty_gallery_and_bad_limits(gallery: Gallery) -> None:
    assert gallery.scroll() == []
    for bad in (0, 1001, -1, True, 2.5, "10"):
        with pytest.raises(InvalidInput, match="limit"):
            gallery.scroll(None, bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        gallery.scroll("a\x00", 10)


def test_delete_many_reports_deleted_and_missing_and_updates_faiss(filled: Gallery) -> None:
    deleted, missing = filled.delete_many(["id-003", "nope", "id-001", "gone"])
    assert deleted == ["id-003", "id-001"] and missing == ["nope", "gone"]
    assert filled.count() == 55 and filled.consistency("v1") == (55, 55)
    hits = filled.search("v1", random_vectors(1, D, seed=1), 57)[0]
    assert {"id-001", "id-003"}.isdisjoint(h.external_id for h in hits) and len(hits) == 55
    assert filled.delete_many(["id-003"]) == ([], ["id-003"])
    assert filled.delete_many([]) == ([], [])
    with pytest.raises(RepeatedIds):
        filled.delete_many(["id-004", "id-004"])
    assert filled.count() == 55


def test_update_metadata_merges_removes_and_replaces(filled: Gallery) -> None:
    before = filled.get_items(["id-005"])["id-005"]
    rec = filled.update_metadata("id-005", {"tag": None, "color": "red", "i": 50})
    assert rec.metadata == {"i": 50, "color": "red"}
    assert rec.updated_at >= before.updated_at and rec.created_at == before.created_at
    assert filled.get_items(["id-005"])["id-005"].metadata == {"i": 50, "color": "red"}
    assert filled.update_metadata("id-005", {"only": [1, {"x": 2}]}, merge=False).metadata == {
        "only": [1, {"x": 2}]
    }
    assert filled.update_metadata("id-005", None, merge=False).metadata is None
    assert filled.update_metadata("id-005", {"a": 1}).metadata == {"a": 1}  # merging into nothing
    assert filled.update_metadata("id-005", {"a": None}).metadata == {}
    # the vector and the index are untouched
    assert filled.consistency("v1") == (57, 57)


def test_update_metadata_refuses_what_an_ingest_refuses_and_unknown_ids(filled: Gallery) -> None:
    deep: dict = {}
    node = deep
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    for bad in ({"k": "\x00"}, {"k": "\udfff"}, {"k": float("nan")}, {"k": "x" * 70_000}, deep):
        with pytest.raises(InvalidInput):
            filled.update_metadata("id-006", bad)
    assert filled.get_items(["id-006"])["id-006"].metadata == {"i": 6, "tag": "t"}  # nothing changed
    with pytest.raises(ItemNotFound):
        filled.update_metadata("nope", {"a": 1})
    with pytest.raises(InvalidInput):
        filled.update_metadata("id-006", [1, 2])  # type: ignore[arg-type]


def test_merge_into_metadata_that_is_not_an_object_is_refused(gallery: Gallery) -> None:
    gallery.add([NewItem("list", random_vectors(1, D)[0], metadata=[1, 2])], "v1")
    with pytest.raises(InvalidInput, match="not an object"):
        gallery.update_metadata("list", {"a": 1})
    assert gallery.update_metadata("list", {"a": 1}, merge=False).metadata == {"a": 1}
