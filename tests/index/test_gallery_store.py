"""Round trips: add / upsert / reembed / delete / search, mixed versions, several spaces, versions."""

from __future__ import annotations

import numpy as np
import pytest

from index import DuplicateIds, Gallery, ItemNotFound, NewItem, VersionConflict, VersionInfo
from tests.index._gallery_data import items, random_vectors


def test_add_then_read_back(gallery: Gallery) -> None:
    x = random_vectors(20, 16)
    ids = gallery.add(items(x), "v1")
    assert len(set(ids)) == 20
    assert gallery.count() == gallery.count("v1") == 20
    assert gallery.counts_by_version() == {"v1": 20} and gallery.counts_by_space() == {"v1": 20}
    rec = gallery.get_items(["item3", "nope"])
    assert list(rec) == ["item3"]
    r = rec["item3"]
    assert r.item_id == ids[3] and r.metadata == {"i": 3} and r.source_uri == "file:///item3.png"
    assert r.embedded_by == {"v1": "v1"}
    assert gallery.get_metadata(["item4"]) == {"item4": {"i": 4}}
    vec, version = gallery.get_embedding("item5", "v1")
    np.testing.assert_allclose(vec, x[5], atol=1e-6)
    assert version == "v1"
    with pytest.raises(ItemNotFound, match="nope"):
        gallery.get_embedding("nope", "v1")
    assert gallery.consistency("v1") == (20, 20)


def test_upsert_inserts_and_replaces(gallery: Gallery) -> None:
    x = random_vectors(10, 16, seed=1)
    y = random_vectors(10, 16, seed=2)
    ids = gallery.add(items(x), "v1")
    ups = [NewItem("item0", y[0], metadata={"new": True}), NewItem("item1", y[1]), NewItem("fresh", y[2])]
    up_ids = gallery.upsert(ups, "v1")
    assert up_ids[:2] == ids[:2] and up_ids[2] not in ids
    assert gallery.count("v1") == 11
    md = gallery.get_metadata(["item0", "item1", "fresh"])
    assert md == {"item0": {"new": True}, "item1": {"i": 1}, "fresh": None}  # None keeps the old metadata
    (hit,) = gallery.search("v1", y[0], 1)[0]
    assert hit.external_id == "item0" and hit.score == pytest.approx(1.0, abs=1e-5)
    # the old vector no longer finds item0 as an exact match, and item0 appears once
    row = gallery.search("v1", x[0], 11)[0]
    assert [h.external_id for h in row].count("item0") == 1
    assert next(h for h in row if h.external_id == "item0").score < 0.99
    assert gallery.consistency("v1") == (11, 11)


def test_delete(gallery: Gallery) -> None:
    x = random_vectors(10, 16, seed=3)
    gallery.add(items(x), "v1")
    assert gallery.delete(["item1", "item2"]) == 2
    assert gallery.count() == 8
    assert all(h.external_id not in ("item1", "item2") for r in gallery.search("v1", x, 10) for h in r)
    with pytest.raises(ItemNotFound, match="'gone'"):
        gallery.delete(["item3", "gone"])
    assert gallery.count() == 8  # all-or-nothing
    assert gallery.delete(["item3", "gone"], missing_ok=True) == 1
    assert gallery.delete([]) == 0
    assert gallery.consistency("v1") == (7, 7)
    # the external id can be reused after deletion
    gallery.add(items(x[1:2], start=1), "v1")
    assert gallery.search("v1", x[1], 1)[0][0].external_id == "item1"


def test_mixed_versions_in_one_space(gallery: Gallery) -> None:
    gallery.register_version(
        VersionInfo("v2", space="v1", embedding_dim=16, compatible_with="v1", card={"a": 1})
    )
    x = random_vectors(30, 16, seed=4)
    gallery.add(items(x[:15]), "v1")
    gallery.add(items(x[15:], start=15), "v2", space="v1")
    assert gallery.counts_by_version() == {"v1": 15, "v2": 15}
    for i, row in enumerate(gallery.search("v1", x, 1)):
        assert row[0].external_id == f"item{i}"
        assert row[0].embedded_by == ("v1" if i < 15 else "v2")
    # re-embed part of v1's items with v2 in place: same space, version updated, new vectors searchable
    y = random_vectors(5, 16, seed=5)
    gallery.reembed([(f"item{i}", y[i]) for i in range(5)], "v2")
    assert gallery.counts_by_version() == {"v1": 10, "v2": 20}
    assert gallery.count("v1") == 30
    for i in range(5):
        (hit,) = gallery.search("v1", y[i], 1)[0]
        assert (hit.external_id, hit.embedded_by) == (f"item{i}", "v2")
        assert gallery.get_items([f"item{i}"])[f"item{i}"].embedded_by == {"v1": "v2"}
    all_hits = gallery.search("v1", x[0], 30)[0]
    assert len(all_hits) == 30 and len({h.external_id for h in all_hits}) == 30
    assert gallery.consistency("v1") == (30, 30)


def test_two_spaces_and_backfill_bookkeeping(gallery: Gallery) -> None:
    """An item can hold an embedding in a new space (backfill) while its old one keeps serving."""
    gallery.register_version(VersionInfo("w1", space="w", embedding_dim=8))
    assert gallery.spaces() == ["v1", "w"] and gallery.space_dim("w") == 8
    x = random_vectors(6, 16, seed=6)
    z = random_vectors(6, 8, seed=7)
    gallery.add(items(x), "v1")
    job = gallery.backfill.create_job("w1", policy={"batch": 2})
    assert (job.status, job.total, job.done, job.space) == ("pending", 6, 0, "w")
    pending = gallery.backfill.pending("w1", limit=4)
    assert [e for _, e, _ in pending] == ["item0", "item1", "item2", "item3"]
    assert pending[0][2] == "file:///item0.png"
    gallery.reembed([(e, z[int(e[4:])]) for _, e, _ in pending[:3]], "w1")
    assert gallery.backfill.progress("w1") == (3, 6)
    assert [e for _, e, _ in gallery.backfill.pending("w1", limit=10, after_item_id=pending[0][0])] == [
        "item3",
        "item4",
        "item5",
    ]
    job = gallery.backfill.update_job(job.id, status="running", done=3)
    assert (job.status, job.done) == ("running", 3)
    assert [j.id for j in gallery.backfill.list_jobs("w1")] == [job.id]
    assert gallery.counts_by_space() == {"v1": 6, "w": 3}
    assert gallery.get_items(["item0"])["item0"].embedded_by == {"v1": "v1", "w": "w1"}
    assert gallery.search("w", z[1], 1)[0][0].external_id == "item1"
    assert gallery.search("v1", x[1], 1)[0][0].external_id == "item1"  # old space untouched
    assert gallery.live_counts("w") == (6, 3) and gallery.live_counts("v1") == (6, 6)
    gallery.delete(["item1"])
    assert gallery.counts_by_space() == {"v1": 5, "w": 2}
    assert gallery.consistency("w") == (2, 2) and gallery.consistency("v1") == (5, 5)
    assert gallery.live_counts("w") == (5, 2) and gallery.live_counts("nowhere") == (5, 0)


def test_live_counts_survive_reopen(database_url: str, tmp_path) -> None:
    d = tmp_path / "d"
    with Gallery.open(database_url, d) as g:
        g.register_version(VersionInfo("v1", space="v1", embedding_dim=16))
        g.add(items(random_vectors(7, 16, seed=1)), "v1")
        g.upsert(items(random_vectors(9, 16, seed=2)), "v1")  # 7 replaced, 2 new
        assert g.live_counts("v1") == (9, 9) == (g.count(), g.count("v1"))
    with Gallery.open(database_url, d) as g:
        assert g.live_counts("v1") == (9, 9)


def test_activation_history_supports_rollback(database_url: str, tmp_path) -> None:
    with Gallery.open(database_url, tmp_path / "d") as g:
        for v in ("v1", "v2"):
            g.register_version(VersionInfo(v, space="v1", embedding_dim=4))
        g.set_active_version("v1")
        g.set_active_version("v2")
        g.set_active_version("v2")  # re-activating the active version adds no entry
        assert g.activation_history() == ["v1", "v2"]
        with pytest.raises(VersionConflict, match="not the previous"):
            g.set_active_version("v2", rollback=True)
        g.set_active_version("v1", rollback=True)
        assert g.activation_history() == ["v1"] and g.active_version() == "v1"


def test_versions_and_active(database_url: str, tmp_path) -> None:
    d = tmp_path / "d"
    with Gallery.open(database_url, d) as g:
        info = VersionInfo("v1", space="v1", embedding_dim=4, card={"classes": [0, 1]})
        g.register_version(info)
        assert g.register_version(info).status == "registered"  # idempotent
        with pytest.raises(VersionConflict, match="another definition"):
            g.register_version(VersionInfo("v1", space="v1", embedding_dim=4, card={"classes": [0]}))
        g.register_version(VersionInfo("v2", space="v1", embedding_dim=4, compatible_with="v1"))
        assert g.active_version() is None
        g.set_active_version("v1")
        g.set_active_version("v2")
        assert g.active_version() == "v2"
        assert {v.version: v.status for v in g.list_versions()} == {"v1": "registered", "v2": "active"}
        with pytest.raises(VersionConflict, match="active"):
            g.set_version_status("v2", "retired")
        g.set_version_status("v1", "retired")
        with pytest.raises(VersionConflict, match="retired"):
            g.add([NewItem("a", np.ones(4))], "v1")
        with pytest.raises(VersionConflict, match="retired"):
            g.set_active_version("v1")
    with Gallery.open(database_url, d) as g:  # persisted
        assert g.active_version() == "v2"
        assert g.get_version("v2").compatible_with == "v1"
        assert g.get_version("v1").status == "retired"
        assert g.get_version("v1").card == {"classes": [0, 1]}


def test_add_refuses_existing_ids_atomically(gallery: Gallery) -> None:
    x = random_vectors(4, 16, seed=8)
    gallery.add(items(x[:2]), "v1")
    with pytest.raises(DuplicateIds, match="already in the gallery: 'item1'"):
        gallery.add(items(x[1:], start=1), "v1")
    assert gallery.count() == 2
    assert gallery.consistency("v1") == (2, 2)
