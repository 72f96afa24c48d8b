"""Two backfill runners (two replicas) on one database: one runs a job at a time, and when its owner dies
(stops renewing without releasing), the other takes the job over once the lease ran out and completes it,
every item written exactly once."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from tests.service.backfill.runner_parts import ingest, open_parts, vec_id_counter, wait_status

CANDIDATE = "v2-indep"


@pytest.mark.slow
def test_a_dead_owners_job_is_taken_over_and_each_item_written_once(
    tiny_models, tiny_test, tmp_path, database_url
) -> None:
    a = open_parts(tiny_models, tmp_path, database_url, data="data-a")
    eids = ingest(a, tiny_test, np.arange(len(tiny_test)))
    b = open_parts(tiny_models, tmp_path, database_url, data="data-b")
    writes: dict[str, Counter[str]] = {"a": Counter(), "b": Counter()}
    for name, parts in (("a", a), ("b", b)):

        def counting(pairs, candidate, _reembed=parts.gallery.reembed, _n=writes[name], **kw):
            out = _reembed(pairs, candidate, **kw)  # raises (nothing written) when the lease is lost
            _n.update(e for e, _ in pairs)
            return out

        parts.gallery.reembed = counting  # type: ignore[method-assign]
    runners = {"a": a.runner(lease_s=1.0), "b": b.runner(lease_s=1.0)}
    for r in runners.values():
        r.start()
    try:
        before = vec_id_counter(a.gallery)
        job = runners["a"].create(CANDIDATE, batch_size=8, rate_limit=40)  # ~5 s for 200 items
        deadline = time.monotonic() + 60
        while (owner := a.gallery.backfill.get_job(job.id).owner) is None or runners["a"].describe(job.id)[
            "done"
        ] < 40:
            assert time.monotonic() < deadline, runners["a"].describe(job.id)
            time.sleep(0.05)
        holder = next(n for n, r in runners.items() if r.owner == owner)
        other = "b" if holder == "a" else "a"
        assert runners[other].describe(job.id)["owner"] == owner  # any replica shows who runs it
        assert sum(writes[other].values()) == 0, "both replicas ran the job"

        # The holder dies: it stops without releasing its lease (as a SIGKILL would leave it).
        dead = runners[holder]
        dead.gallery.backfill.release_job = lambda *a, **k: False  # type: ignore[method-assign]
        dead.stop()
        written_by_dead = sum(writes[holder].values())
        assert 0 < written_by_dead < len(eids)
        assert a.gallery.backfill.get_job(job.id).status == "running"

        done = wait_status(runners[other], job.id, ("done",), timeout=90)
        assert done["done"] == len(eids)
        # the lease is given up as the runner leaves the job, just after it marked the job done
        deadline = time.monotonic() + 10
        while runners[other].describe(job.id)["owner"] is not None:
            assert time.monotonic() < deadline, runners[other].describe(job.id)
            time.sleep(0.05)
        assert sum(writes[holder].values()) == written_by_dead  # the dead one wrote nothing more
    finally:
        for r in runners.values():
            r.stop()
    total = writes["a"] + writes["b"]
    assert set(total) == set(eids) and set(total.values()) == {1}, "an item was written twice"
    assert vec_id_counter(a.gallery) - before == len(eids)
    assert a.gallery.counts_by_version() == {"v1": len(eids), CANDIDATE: len(eids)}
    a.gallery.close()
    b.gallery.close()


@pytest.mark.slow
def test_a_runner_that_lost_its_lease_leaves_the_job(tiny_models, tiny_test, tmp_path) -> None:
    """A stalled owner whose lease ran out and was taken over stops writing at its next renewal."""
    from sqlalchemy import update

    from index.backfill import jobs_t

    parts = open_parts(tiny_models, tmp_path)
    eids = ingest(parts, tiny_test, np.arange(len(tiny_test)))
    runner = parts.runner(lease_s=1.0)
    runner.start()
    try:
        job = runner.create(CANDIDATE, batch_size=4, rate_limit=20)
        deadline = time.monotonic() + 60
        while runner.describe(job.id)["done"] < 8:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # as if this runner had stalled past its lease: it runs out, and another replica claims the job
        with parts.gallery.engine.begin() as conn:
            conn.execute(update(jobs_t).where(jobs_t.c.id == job.id).values(lease_until=None))
        assert parts.gallery.backfill.claim_job(job.id, "other-replica", 60.0)
        time.sleep(0.6)  # its next renewal (every lease_s / 5) finds the lease gone
        left_at = runner.describe(job.id)["done"]
        time.sleep(1.0)
        now = parts.gallery.backfill.get_job(job.id)
        assert runner.describe(job.id)["done"] == left_at < len(eids)
        assert now.status == "running" and now.owner == "other-replica"  # not failed, not released by it
    finally:
        runner.stop()
        parts.gallery.close()
