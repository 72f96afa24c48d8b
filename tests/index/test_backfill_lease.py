"""Backfill job leases (index/backfill.py): several replicas on one database, one holder at a time, and a
lease that ran out is taken over."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from index import Gallery, NewItem
from index.types import VersionInfo


def _two_galleries(url: str, tmp_path: Path) -> tuple[Gallery, Gallery, int]:
    """Two galleries (two replicas) on one database, and a job of candidate v2."""
    a = Gallery.open(url, tmp_path / "a")
    a.register_version(VersionInfo("v1", "v1", 4))
    a.register_version(VersionInfo("v2", "v2", 4))
    a.add([NewItem("x", np.ones(4, np.float32))], "v1")
    b = Gallery.open(url, tmp_path / "b")
    job = a.backfill.create_job("v2", {"order": "sequential"})
    return a, b, job.id


def test_one_replica_holds_a_lease_until_it_runs_out(database_url: str, tmp_path: Path) -> None:
    a, b, job = _two_galleries(database_url, tmp_path)
    try:
        assert a.backfill.claim_job(job, "A", 0.5)
        assert not b.backfill.claim_job(job, "B", 0.5)  # held by A
        assert b.backfill.get_job(job).owner == "A"
        assert a.backfill.claim_job(job, "A", 0.5)  # the holder may claim again (it renews)
        assert a.backfill.renew_lease(job, "A", 0.5)
        assert not b.backfill.renew_lease(job, "B", 0.5)  # only the holder renews
        assert not b.backfill.release_job(job, "B")  # nor releases
        time.sleep(0.7)  # A stops renewing (it died): its lease runs out
        assert b.backfill.claim_job(job, "B", 5.0)
        info = a.backfill.get_job(job)
        assert info.owner == "B" and info.lease_until is not None
        assert not a.backfill.renew_lease(job, "A", 5.0)  # A learns it lost the job
        assert not a.backfill.claim_job(job, "A", 5.0)
        assert b.backfill.release_job(job, "B")
        assert a.backfill.get_job(job).owner is None
        assert a.backfill.claim_job(job, "A", 5.0)  # released: free for anyone at once
    finally:
        a.close()
        b.close()


def test_a_backfill_write_is_fenced_by_the_lease(database_url: str, tmp_path: Path) -> None:
    """A runner whose lease was taken over writes nothing: the write fails in its own transaction."""
    import pytest

    from index.backfill import JobLease
    from index.errors import LeaseLost

    a, b, job = _two_galleries(database_url, tmp_path)
    try:
        assert a.backfill.claim_job(job, "A", 0.3)
        vec = np.array([1, 0, 0, 0], np.float32)
        a.reembed([("x", vec)], "v2", lease=JobLease(job, "A", 0.3))  # holds it: written
        assert a.backfill.progress("v2") == (1, 1)
        a.register_version(VersionInfo("v3", "v2", 4))
        time.sleep(0.5)
        assert b.backfill.claim_job(job, "B", 5.0)  # A stalled past its lease: B took the job over
        with pytest.raises(LeaseLost):
            a.reembed([("x", vec)], "v3", lease=JobLease(job, "A", 0.3))
        assert a.get_embedding("x", "v2")[1] == "v2"  # nothing of A's batch was written
        assert b.backfill.get_job(job).owner == "B"
    finally:
        a.close()
        b.close()


def test_a_second_job_waits_while_another_replica_runs_one(database_url: str, tmp_path: Path) -> None:
    """One job runs at a time across replicas, as in one process: another candidate's jobs would keep
    re-pending each other's items."""
    a, b, first = _two_galleries(database_url, tmp_path)
    try:
        a.register_version(VersionInfo("v3", "v2", 4))
        second = a.backfill.create_job("v3", {"order": "sequential"})
        assert a.backfill.claim_job(first, "A", 0.4)
        a.backfill.update_job(first, status="running")
        assert not b.backfill.claim_job(second.id, "B", 5.0)  # A runs `first` under a live lease
        assert a.backfill.claim_job(second.id, "A", 5.0)  # A itself may (it runs one at a time)
        a.backfill.release_job(second.id, "A")
        time.sleep(0.6)  # A died: its lease on `first` ran out
        assert b.backfill.claim_job(second.id, "B", 5.0)
    finally:
        a.close()
        b.close()
