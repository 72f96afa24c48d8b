"""Backfill bookkeeping in SQL: pending items follow a stored order, skip what is done or skipped, and the
order and skips survive reopening and follow deleted items."""

from __future__ import annotations

import pytest

from index import Gallery, NewItem, VersionInfo
from index.errors import UnknownBackfillJob
from tests.index._gallery_data import random_vectors


@pytest.fixture
def two_versions(gallery: Gallery) -> Gallery:
    """``v1`` with 10 items (x0..x9), ``v2`` registered in the same space, ``w`` in its own space."""
    gallery.register_version(VersionInfo("v2", space="v1", embedding_dim=16, compatible_with="v1"))
    gallery.register_version(VersionInfo("w", space="w", embedding_dim=8))
    vecs = random_vectors(10, 16, seed=1)
    gallery.add(
        [NewItem(f"x{i}", v, source_uri=None if i == 3 else f"blob:{i}") for i, v in enumerate(vecs)], "v1"
    )
    return gallery


def test_ordered_pending_skips_done_and_skipped_items(two_versions: Gallery) -> None:
    g = two_versions
    job = g.backfill.create_job("v2", {"order": "uncertainty"})
    ids = {e: i for i, e, _ in g.backfill.pending("v2", 100)}
    order = [ids[f"x{i}"] for i in (7, 2, 9, 0, 3, 5, 1, 8, 6, 4)]
    assert g.backfill.set_order(job.id, order, scores=list(range(10))) == 10
    assert g.backfill.order(job.id) == order

    first = g.backfill.pending_ordered(job.id, "v2", 3)
    assert [(p, e) for p, _, e, _ in first] == [(0, "x7"), (1, "x2"), (2, "x9")]
    # x2 re-embedded by v2 (done), x3 skipped: both leave the pending list, the rest keeps its order.
    g.reembed([("x2", random_vectors(1, 16, seed=5)[0])], "v2")
    g.backfill.record_skips(job.id, [(ids["x3"], "no source kept")])
    g.backfill.record_skips(job.id, [(ids["x3"], "no source kept")])  # idempotent
    rest = g.backfill.pending_ordered(job.id, "v2", 100)
    assert [e for _, _, e, _ in rest] == ["x7", "x9", "x0", "x5", "x1", "x8", "x6", "x4"]
    assert [e for _, _, e, _ in g.backfill.pending_ordered(job.id, "v2", 2, after_position=4)] == ["x5", "x1"]
    assert [e for _, e, _ in g.backfill.pending("v2", 100, job_id=job.id)] == [
        f"x{i}" for i in (0, 1, 4, 5, 6, 7, 8, 9)
    ]
    assert len(g.backfill.pending("v2", 100)) == 9  # without the job, the skipped item is still pending
    assert g.backfill.skips(job.id) == (1, [("x3", "no source kept")])
    assert g.backfill.progress("v2") == (1, 10)


def test_order_and_skips_survive_reopen_and_follow_deletes(
    two_versions: Gallery, database_url, data_dir
) -> None:
    g = two_versions
    job = g.backfill.create_job("w", {"order": "uncertainty"})
    ids = {e: i for i, e, _ in g.backfill.pending("w", 100)}
    g.backfill.set_order(job.id, [ids[f"x{i}"] for i in range(9, -1, -1)])
    g.backfill.record_skips(job.id, [(ids["x3"], "no source kept")])
    # A new space: an item gets its embedding there, its v1 one is untouched.
    g.reembed([("x9", random_vectors(1, 8, seed=2)[0])], "w")
    assert g.get_items(["x9"])["x9"].embedded_by == {"v1": "v1", "w": "w"}
    g.delete(["x8", "x3"])
    g.close()
    with Gallery.open(database_url, data_dir) as g2:
        assert [e for _, _, e, _ in g2.backfill.pending_ordered(job.id, "w", 100)] == [
            f"x{i}" for i in (7, 6, 5, 4, 2, 1, 0)
        ]
        assert g2.backfill.order_size(job.id) == 8  # the deleted items left the order (cascade)
        assert g2.backfill.skips(job.id)[0] == 0
        assert g2.backfill.progress("w") == (1, 8)
        item_ids, versions, vecs = g2.embeddings_of([ids["x9"], ids["x0"], ids["x1"]], "v1")
        assert item_ids.tolist() == [ids["x9"], ids["x0"], ids["x1"]] and versions == ["v1"] * 3
        assert vecs.shape == (3, 16)
        all_ids, _, all_vecs = g2.space_embeddings("w")
        assert all_ids.tolist() == [ids["x9"]] and all_vecs.shape == (1, 8)
        by_id = g2.items_by_id([ids["x0"], 10_000])
        assert list(by_id) == [ids["x0"]] and by_id[ids["x0"]][:2] == ("x0", "blob:0")
        assert [u for _, _, u in g2.item_sources()].count(None) == 0  # x3, the one without, is deleted


def test_job_updates_and_unknown_jobs(two_versions: Gallery) -> None:
    g = two_versions
    job = g.backfill.create_job("v2", {"order": "sequential"})
    assert (job.status, job.done, job.total) == ("pending", 0, 10)
    upd = g.backfill.update_job(job.id, status="running", policy={"order": "sequential", "stop_at": 0.5})
    assert upd.status == "running" and upd.policy["stop_at"] == 0.5
    with pytest.raises(UnknownBackfillJob):
        g.backfill.get_job(999)
    with pytest.raises(UnknownBackfillJob):
        g.backfill.set_order(999, [1])
