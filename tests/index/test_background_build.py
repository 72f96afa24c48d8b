"""Background index builds: exact search serves meanwhile, writes during the build are not lost, the
installed index equals the database, and its recall against exact search is measured and survives a restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from index import Gallery, VersionInfo, store
from index import background_build as bb
from tests.index._gallery_data import brute_topk, items, unit


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rs = np.random.RandomState(seed)
    centers = rs.randn(32, d)
    return unit(centers[rs.randint(0, 32, n)] + 0.35 * rs.randn(n, d))


def _ids(g: Gallery, q: np.ndarray, k: int) -> list[list[str]]:
    return [[h.external_id for h in row] for row in g.search("v", q, k)]


def test_recall_at_k_leaves_the_query_out():
    approx = np.array([[7, 1, 2, 3], [9, 4, 5, 6]])
    exact = np.array([[3, 2, 1, 7], [9, 4, 5, 8]])
    assert bb.recall_at_k(approx, exact, np.array([7, 9]), 3) == pytest.approx((3 / 3 + 2 / 3) / 2)


def test_exact_top_k_streams_like_brute_force():
    x = _clustered(3000, 16, seed=3)
    q = x[:40]
    acc = bb._ExactTopK(q, 6)
    for s in range(0, 3000, 700):
        acc.update(np.arange(s, min(s + 700, 3000), dtype=np.int64), x[s : s + 700], step=256)
    _, want = brute_topk(x, q, 6)
    assert [set(r) for r in acc.ids.tolist()] == [set(r) for r in want.tolist()]


@pytest.mark.parametrize("factory", ["IVF8,Flat", "HNSW16"])
def test_build_runs_off_to_the_side_and_keeps_every_write(
    database_url: str, tmp_path: Path, monkeypatch, factory: str
) -> None:
    x = _clustered(1500, 16, seed=11)
    gate, reading = threading.Event(), threading.Event()
    real_scan = bb.store.scan_space

    def slow_scan(*a, **kw):  # hold the build after it started reading SQL, to write meanwhile
        for chunk in real_scan(*a, **kw):
            reading.set()
            assert gate.wait(30)
            yield chunk

    monkeypatch.setattr(bb.store, "scan_space", slow_scan)
    with Gallery.open(
        database_url,
        tmp_path / "d",
        index_factory=factory,
        min_train=400,
        background_builds=True,
        recall_sample=200,
    ) as g:
        g.register_version(VersionInfo("v", space="v", embedding_dim=16))
        g.add(items(x[:1000]), "v")  # crosses min_train: a background build starts; this call returned
        assert reading.wait(30)
        info = g.index_info("v")
        assert info["staging"] and info["building"] is not None
        # searches keep working on the exact staging index
        _, want = brute_topk(x[:1000], x[:10], 5)
        assert _ids(g, x[:10], 5) == [[f"item{i}" for i in w] for w in want]
        # writes land meanwhile: adds, deletes of rows the build has read, upserts (new vec_ids)
        g.add(items(x[1000:1200], start=1000), "v")
        g.delete([f"item{i}" for i in range(0, 1000, 10)])
        g.delete([f"item{i}" for i in range(1000, 1200, 20)])
        g.upsert(items(x[1200:1250], start=0), "v")  # item0..49 get new vectors (ids 0, 10.. were deleted)
        gate.set()
        assert g.wait_for_index_builds(60)
        info = g.index_info("v")
        assert not info["staging"] and info["built_factory"] == factory and info["building"] is None
        report = info["last_build"]
        assert report["vectors"] >= 1000 and report["replayed"] >= 4 and report["sample"] == 200
        assert report["recall"] >= 0.9, report
        live, sql = g.consistency("v")
        assert live == sql == 1200 - 100 - 10 + 5  # upsert re-inserted the 5 deleted of item0..49
        sidx = g._space_index("v")
        with g.engine.connect() as conn:
            sql_ids = set(store.vec_ids_upto(conn, "v", 1 << 62).tolist())
        in_index = set(sidx.index_ids().tolist()) - set(sidx._tombstones)
        assert in_index == set(sidx.entries) == sql_ids  # index == DB, id for id
        hits = {h.external_id for row in g.search("v", x[:1250], 10) for h in row}
        assert not hits & {f"item{i}" for i in range(50, 1000, 10)}  # (upsert brought back item0..40)
        assert not hits & {f"item{i}" for i in range(1000, 1200, 20)}
        # the upserted items are found by their new vectors
        assert [row[0].external_id for row in g.search("v", x[1200:1210], 1)] == [
            f"item{i}" for i in range(10)
        ]
    # restart: the built index comes back from its snapshot with its report
    with Gallery.open(
        database_url, tmp_path / "d", index_factory=factory, min_train=400, background_builds=True
    ) as g:
        info = g.index_info("v")
        assert info["built_factory"] == factory and not info["staging"] and info["building"] is None
        assert info["last_build"] is not None and info["last_build"]["recall"] == report["recall"]
        assert g.consistency("v") == (live, sql)


def test_open_without_snapshot_serves_exactly_then_builds(database_url: str, tmp_path: Path) -> None:
    """A gallery reopened with a new approximate factory serves exact search at once and builds in the
    background (the synchronous path would block the open for the whole build)."""
    x = _clustered(800, 16, seed=5)
    with Gallery.open(database_url, tmp_path / "d") as g:
        g.register_version(VersionInfo("v", space="v", embedding_dim=16))
        g.add(items(x), "v")
    with Gallery.open(
        database_url,
        tmp_path / "d",
        index_factory="HNSW16",
        min_train=500,
        background_builds=True,
        recall_sample=100,
    ) as g:
        assert g.search("v", x[3], 1)[0][0].external_id == "item3"
        assert g.wait_for_index_builds(60)
        info = g.index_info("v")
        assert info["built_factory"] == "HNSW16" and info["last_build"]["recall"] >= 0.9
        assert g.consistency("v") == (800, 800)
        assert g.rebuild_index("v", "test")  # an explicit rebuild measures again
        assert g.wait_for_index_builds(60)
        assert g.index_info("v")["last_build"]["reason"] == "test"


def test_live_counts_never_disagree_while_writers_run(tmp_path: Path) -> None:
    """The item count and the index's live count are read together: a reader between a writer's commit and
    its index update saw them disagree, and a hot swap was refused as if the gallery were in another space
    (found by bench/soak.py)."""
    x = _clustered(400, 8, seed=2)
    with Gallery.open(None, tmp_path / "d") as g:
        g.register_version(VersionInfo("v", space="v", embedding_dim=8))
        g.add(items(x[:200]), "v")
        stop = threading.Event()
        bad: list[tuple[int, int]] = []

        def writer() -> None:
            i = 200
            while not stop.is_set():
                g.add(items(x[i % 400 : i % 400 + 1], start=i), "v")
                g.delete([f"item{i}"])
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                total, live = g.live_counts("v")
                if total != live:
                    bad.append((total, live))
        finally:
            stop.set()
            t.join()
        assert bad == []
