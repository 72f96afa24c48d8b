"""The transform backfill (``kind: transform``): the candidate's space written from the stored vectors.

For a candidate trained without BCT (a space of its own), a learned map from the serving space into the
candidate's (:mod:`service.models.transforms`) turns each item's stored vector into a candidate-space vector:
no source is read, no image decoded, no network run, so it costs a SQL read, a small matrix product and a
SQL write per item. Rows are written with route ``transform``: the candidate can be activated over them, and
an image backfill of the candidate later still re-embeds each such item from its source (most uncertain first
with ``policy: uncertainty``), replacing the transformed vector by a true one.

Exactly once and resumable as the image backfill, through the same write path (``gallery.reembed`` under the
job's lease): an item leaves the pending list in the transaction that stores its vector, so a killed job
resumes where its last commit left it. An item with no stored vector in the source space is skipped, with the
reason.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Protocol

import numpy as np

from index import Gallery
from index.backfill import BackfillJobInfo
from service.backfill.job_host import JobHost
from service.backfill.progress import JobProgress
from trainer import VectorTransform


class TransformRunner(JobHost, Protocol):
    """What a transform job uses of the runner that runs it (a protocol: the runner imports this module)."""

    gallery: Gallery

    def wait(self, seconds: float) -> None: ...

    def _write_mapped(
        self, job_id: int, candidate: str, item_ids: list[int], eids: list[str], vectors: np.ndarray
    ) -> int: ...


log = logging.getLogger(__name__)

TRANSFORM_BATCH = (
    16384  # items per transaction: the work per item is tiny, so each statement's overhead is what costs
)
SKIP_LIST = 10_000


def run_transform(
    runner: TransformRunner, job: BackfillJobInfo, live: JobProgress, transform: VectorTransform
) -> None:
    """Run a transform job until it is done, paused, cancelled, stopped, or loses its lease."""
    gallery, candidate = runner.gallery, job.candidate
    spec = job.policy or {}
    source_space = str(spec["source_space"])
    done, total = gallery.backfill.progress(candidate, "transform")
    gallery.backfill.update_job(job.id, done=done, total=total)
    live.done, live.total = done, total
    live.phase = "transforming"
    after, saved_at = 0, time.monotonic()
    paced_from, paced_items, paced_rate = time.monotonic(), 0, None
    while True:
        current = runner._status(job.id)
        if current is None:  # paused, cancelled, stopping or lease lost: leave the row's counters exact
            runner._save_progress(job.id, done, total)
            return
        spec = current.policy or {}
        rate = spec.get("rate_limit")
        if rate != paced_rate:
            paced_from, paced_items, paced_rate = time.monotonic(), 0, rate
        if rate:
            sleep_s = paced_from + paced_items / rate - time.monotonic()
            if sleep_s > 0:
                runner.wait(sleep_s)
                continue
        limit = int(spec.get("batch_size") or TRANSFORM_BATCH)
        if rate:
            limit = min(limit, max(1, int(rate / 4)))
        stop_at = spec.get("stop_at")
        if stop_at:
            target = math.ceil(stop_at * total - 1e-9)
            if done >= target:
                log.info(
                    "transform job %d: reached its stop point %.3f (%d/%d)", job.id, stop_at, done, total
                )
                runner._finish(job.id, "paused", done, total)
                return
            limit = min(limit, target - done)
        t0 = time.perf_counter()
        ids, eids, vectors = gallery.backfill.pending_vectors(candidate, source_space, limit, after, job.id)
        live.timed("list", t0)
        if not ids:
            if after:  # a new pass: items ingested behind the cursor since it passed
                after = 0
                continue
            missing = gallery.backfill.pending_without_vector(candidate, source_space, SKIP_LIST, job.id)
            if missing:
                why = f"no stored vector in space {source_space!r} to transform"
                runner._write(job.id, candidate, [], [(i, why) for i, _ in missing], live)
                continue
            runner._complete(job, live)
            return
        after = ids[-1]
        t0 = time.perf_counter()
        mapped = transform.apply(vectors)  # (m, D_candidate), unit rows
        live.timed("transform", t0)
        t0 = time.perf_counter()
        n_ok = runner._write_mapped(job.id, candidate, ids, eids, mapped)
        live.timed("write", t0)
        done, total, saved_at = runner._account(job, live, done, n_ok, 0, saved_at)
        paced_items += n_ok
