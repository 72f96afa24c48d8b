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
