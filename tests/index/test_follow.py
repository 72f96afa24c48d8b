"""Two galleries on one database (two replicas): each follows the other's writes with ``Gallery.follow``,
and their searches then equal brute force over what SQL holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index import Gallery, VersionInfo
from tests.index._gallery_data import brute_topk, items, random_vectors

D = 16


def _pair(database_url: str, tmp_path: Path, factory: str = "Flat") -> tuple[Gallery, Gallery]:
    a = Gallery.open(database_url, tmp_path / "data", index_factory=factory, index_dir=tmp_path / "index-a")
    b = Gallery.open(database_url, tmp_path / "data", index_factory=factory, index_dir=tmp_path / "index-b")
    return a, b


def _ids(g: Gallery, q: np.ndarray, k: int) -> list[list[str]]:
    return [[h.external_id for h in row] for row in g.search("v1", q, k)]


def _truth(g: Gallery, q: np.ndarray, k: int) -> list[list[str]]:
    """Top-k ids by brute force over the vectors SQL holds in space v1."""
    item_ids, _, vecs = g.space_embeddings("v1")
    names = g.items_by_id(item_ids.tolist())
    _, idx = brute_topk(vecs, q, k)
    return [[names[int(item_ids[i])][0] for i in row] for row in idx]


def test_replica_follows_adds_deletes_and_reembeds(database_url: str, tmp_path: Path) -> None:
    a, b = _pair(database_url, tmp_path)
    try:
        a.register_version(VersionInfo("v1", space="v1", embedding_dim=D))
        a.register_version(VersionInfo("v2", space="v1", embedding_dim=D, compatible_with="v1"))
        a.add(items(random_vectors(60, D, seed=1)), "v1")
        report = b.follow()
        assert report is not None and report.new_spaces == ["v1"]
        assert b.live_counts("v1") == (60, 60)

        b.add(items(random_vectors(20, D, seed=2), prefix="b"), "v1")  # b's own write: no follow needed
        assert b.follow() is None
        a.follow()
        a.delete(["item3", "b4"])
        a.delete_many(["item5", "nope"])
        a.reembed(
            [(f"item{i}", v) for i, v in zip(range(10, 20), random_vectors(10, D, seed=3), strict=True)], "v2"
        )
        report = b.follow()
        assert report is not None and report.removed == 3 + 10 and report.added == 10
        assert b.live_counts("v1") == a.live_counts("v1") == (77, 77)
        assert b.followed == a.followed

        q = random_vectors(12, D, seed=4)
        assert _ids(b, q, 10) == _ids(a, q, 10) == _truth(a, q, 10)
        assert b.follow() is None  # nothing new: one query, nothing applied
    finally:
        a.close()
        b.close()


def test_interleaved_writers_converge(database_url: str, tmp_path: Path) -> None:
    """Both write in turns without following in between (own writes past the other's are re-read and
    skipped); after one follow each, both equal SQL."""
    a, b = _pair(database_url, tmp_path)
    try:
        a.register_version(VersionInfo("v1", space="v1", embedding_dim=D))
        b.follow()
        for r in range(5):
            a.add(items(random_vectors(7, D, seed=10 + r), prefix=f"a{r}-"), "v1")
            b.add(items(random_vectors(5, D, seed=20 + r), prefix=f"b{r}-"), "v1")
            b.delete([f"a{r}-0"]) if r % 2 else a.delete([f"b{r}-1"])
        a.follow()
        b.follow()
        assert a.live_counts("v1") == b.live_counts("v1") == (55, 55)
        q = random_vectors(8, D, seed=5)
        assert _ids(a, q, 15) == _ids(b, q, 15) == _truth(a, q, 15)
    finally:
        a.close()
        b.close()


@pytest.mark.slow
def test_follow_on_an_index_with_tombstones(database_url: str, tmp_path: Path) -> None:
    """HNSW cannot remove ids: the follower's drops become tombstones, and searches skip them."""
    a, b = _pair(database_url, tmp_path, factory="HNSW16")
    try:
        a.register_version(VersionInfo("v1", space="v1", embedding_dim=D))
        a.add(items(random_vectors(300, D, seed=6)), "v1")
        b.follow()
        b.wait_for_index_builds(60)
        a.delete([f"item{i}" for i in range(0, 300, 3)])
        b.follow()
        assert b.live_counts("v1") == (200, 200)
        q = random_vectors(5, D, seed=7)
        for row in _ids(b, q, 20):
            assert all(int(e.removeprefix("item")) % 3 for e in row)
    finally:
        a.close()
        b.close()


def test_replica_opens_a_space_made_elsewhere(database_url: str, tmp_path: Path) -> None:
    a, b = _pair(database_url, tmp_path)
    try:
        a.register_version(VersionInfo("v1", space="v1", embedding_dim=D))
        a.add(items(random_vectors(10, D, seed=8)), "v1")
        b.follow()
        a.register_version(VersionInfo("w1", space="w1", embedding_dim=8))
        a.reembed([(f"item{i}", random_vectors(1, 8, seed=i)[0]) for i in range(10)], "w1")
        report = b.follow()
        assert report is not None and report.new_spaces == ["w1"]
        assert b.live_counts("w1") == (10, 10)
        assert b.spaces() == ["v1", "w1"]
    finally:
        a.close()
        b.close()


def test_an_ingest_is_refused_once_another_replica_switched_the_active_space(
    database_url: str, tmp_path: Path
) -> None:
    """b embedded with v1 (space v1) while a activated w1 (space w1): b's write stores nothing, and a
    switch of space is refused while any item lacks an embedding in the new space (counted in SQL)."""
    from index.errors import ActiveSpaceChanged, VersionConflict

    a, b = _pair(database_url, tmp_path)
    try:
        a.register_version(VersionInfo("v1", space="v1", embedding_dim=D))
        a.register_version(VersionInfo("w1", space="w1", embedding_dim=8))
        a.set_active_version("v1")
        a.add(items(random_vectors(4, D, seed=1)), "v1", expect_active_space="v1")
        b.follow()
        b.add(items(random_vectors(1, D, seed=2), prefix="late"), "v1", expect_active_space="v1")
        # a has not followed b's item: its own counts say w1 covers the gallery, SQL says otherwise
        a.reembed([(f"item{i}", random_vectors(1, 8, seed=i)[0]) for i in range(4)], "w1")
        with pytest.raises(VersionConflict, match="1 items have no embedding"):
            a.set_active_version("w1", require_complete_space=True)
        a.reembed([("late0", random_vectors(1, 8, seed=9)[0])], "w1")
        a.set_active_version("w1", require_complete_space=True)
        with pytest.raises(ActiveSpaceChanged):
            b.add(items(random_vectors(1, D, seed=3), prefix="later"), "v1", expect_active_space="v1")
        assert b.get_items(["later0"]) == {}
    finally:
        a.close()
        b.close()
