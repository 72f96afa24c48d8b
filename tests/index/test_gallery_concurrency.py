"""Searches in several threads while another thread adds, re-embeds and deletes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from index import Gallery, VersionInfo
from index.rwlock import RWLock
from tests.index._gallery_data import items, random_vectors

BATCHES = 15  # writer iterations: add 10, delete 4, re-embed 1


@pytest.mark.parametrize("factory", ["Flat", pytest.param("HNSW16", marks=pytest.mark.slow)])
def test_searches_run_while_writer_mutates(database_url: str, data_dir: Path, factory: str) -> None:
    g = Gallery.open(
        database_url, data_dir, index_factory=factory, snapshot_every=200, tombstone_fraction=0.1
    )
    g.register_version(VersionInfo("v1", space="v1", embedding_dim=16))
    g.register_version(VersionInfo("v2", space="v1", embedding_dim=16, compatible_with="v1"))
    x = random_vectors(300, 16, seed=31)
    g.add(items(x), "v1")
    ever = {f"item{i}" for i in range(300)}  # every id that existed at some point
    deleted_at: dict[str, float] = {}  # id -> when its delete was acknowledged
    errors: list[str] = []
    searches = [0]
    stop = threading.Event()

    def searcher(seed: int) -> None:
        rs = np.random.RandomState(seed)
        try:
            while not stop.is_set():
                started = time.monotonic()
                q = rs.randn(rs.randint(1, 4), 16).astype(np.float32)
                for row in g.search("v1", q, 8):
                    ids = [h.external_id for h in row]
                    if len(set(ids)) != len(ids):
                        errors.append(f"duplicate ids in one answer: {ids}")
                    if [h.score for h in row] != sorted((h.score for h in row), reverse=True):
                        errors.append("scores not sorted")
                    for h in row:
                        if h.external_id not in ever:
                            errors.append(f"unknown id {h.external_id}")
                        t = deleted_at.get(h.external_id)
                        if t is not None and t < started:
                            errors.append(f"{h.external_id} returned after its delete was acknowledged")
                        if h.embedded_by not in ("v1", "v2"):
                            errors.append(f"bad embedded_by {h.embedded_by}")
                searches[0] += 1
        except Exception as e:  # noqa: BLE001 - any error fails the test
            errors.append(repr(e))

    def writer() -> None:
        try:
            rs = np.random.RandomState(7)
            for b in range(BATCHES):
                new = items(random_vectors(10, 16, seed=100 + b), prefix="w", start=10 * b)
                ever.update(it.external_id for it in new)  # before the call: may show up once it commits
                g.add(new, "v1")
                victims = [
                    f"item{i}" for i in rs.choice(300, 4, replace=False) if f"item{i}" not in deleted_at
                ]
                g.delete(victims)
                now = time.monotonic()
                deleted_at.update({v: now for v in victims})
                g.reembed([(f"w{10 * b}", rs.randn(16).astype(np.float32))], "v2")
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            stop.set()

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(4)] + [
        threading.Thread(target=writer)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:5]
    assert searches[0] > 20
    assert g.consistency("v1") == (g.count("v1"), g.count("v1"))
    assert g.count("v1") == 300 + 10 * BATCHES - len(deleted_at)
    g.close()


def test_rwlock_readers_share_writers_exclude() -> None:
    lock = RWLock()
    inside: list[str] = []
    log: list[tuple[str, int]] = []
    barrier = threading.Barrier(3)

    def reader(i: int) -> None:
        with lock.read():
            inside.append("r")
            barrier.wait(timeout=5)  # all three readers inside at once
            log.append(("r", len([x for x in inside if x == "w"])))
            inside.remove("r")

    readers = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(5)
    assert len(log) == 3

    order: list[str] = []
    lock.acquire_read()
    w = threading.Thread(target=lambda: (lock.acquire_write(), order.append("w"), lock.release_write()))
    w.start()
    time.sleep(0.05)
    r = threading.Thread(target=lambda: (lock.acquire_read(), order.append("r2"), lock.release_read()))
    r.start()
    time.sleep(0.05)
    assert order == []  # the writer waits for the reader; the new reader waits behind the writer
    lock.release_read()
    w.join(5)
    r.join(5)
    assert order == ["w", "r2"]
