"""The backfill runner: a background thread of the service that re-embeds the gallery with a candidate
version while searches go on.

Jobs live in SQL (``backfill_jobs``): the thread runs the oldest ``running`` job (so a restarted service
resumes what it was doing), else starts the oldest ``pending`` one; one job at a time. Per batch it lists
pending items (SQL: not yet embedded by the candidate in its space, not skipped by the job), reads each
item's source from the blob store, decodes and embeds the batch, and calls ``gallery.reembed`` (one SQL
transaction, then FAISS). Progress is therefore the embeddings themselves:

- exactly once: an item leaves the pending list in the transaction that stores its new embedding, so a
  batch is either committed (never listed again) or rolled back (listed again after a restart); nothing
  else writes embeddings with the candidate except ingest while it is active, whose items are done anyway;
- resume: a restarted job recomputes nothing but its cursor; an ordered job re-reads its stored order.

Same-space candidate (a BCT child): items are replaced in place, the gallery is mixed meanwhile (every hit
says who embedded it). Other-space candidate: ``reembed`` adds each item's embedding in the candidate's
space beside the old one; searches stay on the old space, and the registry refuses to activate the
candidate until every item has an embedding there (then the swap is one reference, atomic for requests).

Control (pause / resume / cancel) changes the job's status in SQL under this runner's lock; the thread
checks it between batches, so a change takes effect within one batch. ``rate_limit`` caps items/s: batches
shrink to about a quarter of a second's budget and the thread sleeps between them (waking on control).

Engines: ``local`` (default) embeds in this thread; ``ray`` (:mod:`service.backfill.ray_engine`) embeds on a
Ray Data actor pool and writes here, through the same exactly-once path. The job's ``policy`` JSON says which.

Several replicas on one database: a job runs in the replica holding its lease (``owner``, ``lease_until`` in
SQL). The thread only takes a job it can claim, renews the lease between batches (at most every
``lease_s / 5``, and from a helper thread during long steps without batches: ordering, a Ray pool starting),
and gives it up when it leaves the job; a replica that dies stops renewing, and another claims the job once
the lease ran out. Pause/resume/cancel from any replica work through the SQL status the owner reads.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.exc import IntegrityError

from index import Gallery
from index.backfill import JOB_KINDS, BackfillJobInfo, JobLease, job_kind
from index.errors import GalleryClosed, ItemNotFound, LeaseLost
from index.types import ROUTE_MODEL, ROUTE_TRANSFORM
from service.backfill.order import POLICIES, uncertainty_order
from service.backfill.pending import PendingCursor
from service.backfill.progress import JobProgress
from service.backfill.ray_engine import ENGINES, RayOptions, ray_installed, require_ray, shutdown_ray
from service.backfill.sources import read_source
from service.backfill.transform_job import run_transform
from service.blobs import BlobStore
from service.errors import BackfillConflict, BadRequest
from service.models.cache import ModelCache
from service.models.hot_swap import HotSwap, space_problem
from service.models.transforms import TransformStore
from trainer import LoadedModel, ModelCardError, NoImageModel, embed_images

log = logging.getLogger(__name__)

ACTIVE = ("pending", "running", "paused")  # a job that may still re-embed items
PROGRESS_EVERY_S = 1.0  # the job row's counters are rewritten this often (one small commit), not per batch
LEASE_S = 15.0


def runner_id() -> str:
    """``hostname:pid:random``: unique per runner, and says where a job runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class _Lease:
    """This runner's hold on one job's lease (``lost`` once another replica took the job over)."""

    def __init__(self, gallery: Gallery, job_id: int, owner: str, lease_s: float) -> None:
        self.gallery, self.job_id, self.owner, self.lease_s = gallery, job_id, owner, lease_s
        self.lost = False
        self._renewed = time.monotonic()
        self._lock = threading.Lock()

    def renew(self, force: bool = False) -> bool:
        """Extend the lease (at most every lease_s / 5 unless ``force``: one UPDATE, not one per batch);
        False once lost. A database error keeps going: the next renewal tells whether the lease held."""
        with self._lock:
            if self.lost:
                return False
            if not force and time.monotonic() - self._renewed < self.lease_s / 5:
                return True
            try:
                ok = self.gallery.backfill.renew_lease(self.job_id, self.owner, self.lease_s)
            except GalleryClosed:
                return False
            except Exception:
                log.exception("backfill job %d: cannot renew its lease", self.job_id)
                return True
            self._renewed = time.monotonic()
            if not ok:
                self.lost = True
                log.warning(
                    "backfill job %d: its lease was taken over by another replica; leaving it", self.job_id
                )
            return ok

    @contextmanager
    def kept(self) -> Iterator[None]:
        """Renew from a helper thread every lease_s / 3 while a step without batches runs (ordering, a Ray
        pool starting or recovering), so a slow step does not hand the job to another replica."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.lease_s / 3) and self.renew(force=True):
                pass

        t = threading.Thread(target=beat, name=f"backfill-lease-{self.job_id}", daemon=True)
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join()

    def release(self) -> None:
        try:
            self.gallery.backfill.release_job(self.job_id, self.owner)
        except Exception:  # closed or unreachable: the lease runs out by itself
            log.debug("backfill job %d: lease not released", self.job_id, exc_info=True)


@dataclass
class _Batch:
    """Items read and decoded, ready to embed: ``eids[i]`` has ``images[i]``; ``skips`` have no usable source."""

    size: int
    eids: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    skips: list[tuple[int, str]] = field(default_factory=list)


class BackfillRunner:
    """Backfill jobs of one service process: control methods for the routes, and the worker thread."""

    def __init__(
        self,
        gallery: Gallery,
        swap: HotSwap,
        models: ModelCache,
        blobs: BlobStore,
        *,
        batch_size: int = 256,
        rate_limit: float | None = None,
        max_image_pixels: int = 1 << 20,
        on_embedded: Callable[[str, int], None] | None = None,
        idle_poll_s: float = 5.0,
        lease_s: float = LEASE_S,
        owner: str | None = None,
        ray: RayOptions | None = None,
        transforms: TransformStore | None = None,
    ) -> None:
        self.gallery, self.swap, self.models, self.blobs = gallery, swap, models, blobs
        self.lease_s = lease_s
        self.owner = owner or runner_id()
        self.ray = ray or RayOptions()
        self._lease: _Lease | None = None  # the lease of the job the thread is in
        self.registry = swap.registry
        self.transforms = transforms or TransformStore(self.registry)
        self.batch_size, self.rate_limit = batch_size, rate_limit
        self.max_image_pixels = max_image_pixels
        self.on_embedded = on_embedded
        self.idle_poll_s = idle_poll_s
        self._cond = threading.Condition()  # guards job status transitions and wakes the thread
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._live: dict[int, JobProgress] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="backfill-read")  # reads the next batch ahead

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the worker thread; jobs left ``running`` by a previous process resume first."""
        left = [j.id for j in self.gallery.backfill.list_jobs() if j.status == "running"]
        if left:
            log.info("resuming backfill jobs %s", left)
        self._thread = threading.Thread(target=self._main, name="backfill-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the batch in flight (its transaction commits or not at all); jobs stay ``running``
        in SQL, so the next start resumes them."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the backfill runner did not stop within %.0fs", timeout)
        self._pool.shutdown(wait=True)
        shutdown_ray()  # a local Ray cluster this process started stops with it

    # ------------------------------------------------------------------ control (any thread)
    def create(
        self,
        candidate: str,
        policy: str = "sequential",
        *,
        rate_limit: float | None = None,
        batch_size: int | None = None,
        stop_at: float | None = None,
        engine: str = "local",
        address: str | None = None,
        workers: int | None = None,
        kind: str = "image",
        source: str | None = None,
    ) -> BackfillJobInfo:
        """A new ``pending`` job. Refused (:class:`BackfillConflict`) while another job of the same
        candidate may still run; unknown or refused versions raise the registry's errors. ``engine="ray"``
        embeds on a Ray cluster (``address``; None: a local one) with ``workers`` actors (None: the
        service's default); :class:`~service.backfill.ray_engine.RayUnavailable` when Ray is not installed,
        ``RayAddressRefused`` for an address the server is not configured to trust.

        ``kind="transform"`` writes the candidate's space from the stored vectors of ``source``'s space (None:
        the active version) through the transform fitted between them (:class:`NoTransform` without one):
        no source is read; local engine, item-id order."""
        if kind not in JOB_KINDS:
            raise BadRequest(f"kind must be one of {', '.join(JOB_KINDS)}, not {kind!r}")
        if policy not in POLICIES:
            raise BadRequest(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        if engine not in ENGINES:
            raise BadRequest(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        if kind == "transform" and (engine != "local" or policy != "sequential"):
            raise BadRequest(
                "a transform job runs in the server, in item-id order (engine local, policy sequential): it "
                "reads no image, so there is nothing to spread or to order"
            )
        if kind == "image" and source is not None:
            raise BadRequest(
                "source is the version whose stored vectors a transform job maps: kind transform"
            )
        if engine == "ray":
            require_ray()
            self.ray.check_address(address)
        card = self.registry.entry(candidate).card  # ModelNotFound / InvalidModel, and registers the version
        transform_spec: dict[str, Any] = {}
        if kind == "transform":
            transform_spec = self._transform_spec(candidate, source)
        elif card is not None and card.external:
            raise NoImageModel(
                candidate,
                "a backfill re-embeds the gallery's images, so it cannot run with it: send its vectors with "
                "POST /v1/items (upsert: true) instead",
            )
        spec = {
            "order": policy,
            "rate_limit": rate_limit if rate_limit is not None else self.rate_limit,
            "batch_size": int(batch_size or self.batch_size),
            "stop_at": stop_at,
            # engine fields live in the policy JSON (no migration); workers None: the runner's default
            "engine": engine,
            "address": address if engine == "ray" else None,
            "workers": workers if engine == "ray" else None,
            "kind": kind,
            **transform_spec,
        }
        with self._cond:
            busy = [j.id for j in self.gallery.backfill.list_jobs(candidate) if j.status in ACTIVE]
            if busy:
                raise BackfillConflict(
                    f"backfill job {busy[0]} of {candidate} is not finished: resume or cancel it "
                    f"(GET /v1/backfill/{busy[0]})"
                )
            job = self.gallery.backfill.create_job(candidate, spec)
            self._cond.notify_all()
        log.info("backfill job %d: %s, policy %s", job.id, candidate, spec)
        return job

    def _transform_spec(self, candidate: str, source: str | None) -> dict[str, Any]:
        """Where a transform job maps from: ``source`` (None: the active version), checked to have a usable
        transform into ``candidate`` and another space."""
        if source is None:
            active = self.swap.active
            if active is None:
                raise BadRequest("no model is active: name the source version whose stored vectors to map")
            source = active.version
        if source == candidate:
            raise BadRequest(
                f"a transform maps another version's vectors into {candidate}'s space, not its own"
            )
        src = self.registry.entry(source).card
        cand = self.registry.entry(candidate).card
        assert src is not None and cand is not None
        if src.space == cand.space:
            raise BadRequest(
                f"{source} and {candidate} share space {cand.space!r}: the stored vectors already serve "
                f"{candidate}'s queries; run an image backfill (kind image) to replace them"
            )
        self.transforms.get(candidate, source)  # NoTransform when there is none, or it is stale
        return {"source": source, "source_space": src.space}

    def pause(self, job_id: int) -> BackfillJobInfo:
        with self._cond:
            job = self.gallery.backfill.get_job(job_id)
            if job.status == "paused":
                return job
            if job.status not in ("pending", "running"):
                raise BackfillConflict(
                    f"backfill job {job_id} is {job.status}: only pending or running jobs pause"
                )
            job = self.gallery.backfill.update_job(job_id, status="paused")
            self._cond.notify_all()
            return job

    def resume(
        self, job_id: int, *, stop_at: float | None = None, rate_limit: float | None = None
    ) -> BackfillJobInfo:
        """Resume a paused (or failed) job; ``stop_at`` replaces its stop point (None: run to the end)."""
        with self._cond:
            job = self.gallery.backfill.get_job(job_id)
            if job.status not in ("paused", "failed", "pending", "running"):
                raise BackfillConflict(
                    f"backfill job {job_id} is {job.status}: it cannot be resumed "
                    "(start a new one: finished items are not re-embedded)"
                )
            spec = dict(job.policy or {})
            spec["stop_at"] = stop_at
            if rate_limit is not None:
                spec["rate_limit"] = rate_limit
            others = [
                j for j in self.gallery.backfill.list_jobs() if j.status == "running" and j.id != job_id
            ]
            status = (
                job.status if job.status in ("pending", "running") else ("pending" if others else "running")
            )
            job = self.gallery.backfill.update_job(job_id, status=status, policy=spec, error=None)
            self._cond.notify_all()
            return job

    def cancel(self, job_id: int) -> BackfillJobInfo:
        """Stop a job for good; what it re-embedded stays (a later job skips those items)."""
        with self._cond:
            job = self.gallery.backfill.get_job(job_id)
            if job.status == "cancelled":
                return job
            if job.status not in ACTIVE and job.status != "failed":
                raise BackfillConflict(f"backfill job {job_id} is {job.status}: nothing to cancel")
            job = self.gallery.backfill.update_job(job_id, status="cancelled")
            self._cond.notify_all()
            return job

    def describe(self, job: BackfillJobInfo | int) -> dict[str, Any]:
        """A job as the API shows it: its row, skips, and (while this process runs it) rate and ETA."""
        if not isinstance(job, BackfillJobInfo):
            job = self.gallery.backfill.get_job(job)
        spec = job.policy or {}
        live = self._live.get(job.id) or JobProgress()
        n_skip, examples = self.gallery.backfill.skips(job.id, 10)
        rate = live.rate() if job.status == "running" else None
        done, total = job.done, job.total
        if (
            live.done is not None and live.total is not None
        ):  # the thread is in this job: fresher than the row
            done, total = live.done, live.total
        left = max(total - done - n_skip, 0)
        # what this process last read of the candidate's folder: a poll never re-reads (or re-hashes) it
        engine = spec.get("engine") or "local"
        known = self.registry.known(job.candidate)
        can_activate = (
            None if known is None or known.card is None else space_problem(self.gallery, known.card) is None
        )
        return {
            "id": job.id,
            "candidate": job.candidate,
            "space": job.space,
            "status": job.status,
            "phase": live.phase if job.status == "running" else None,
            "kind": job_kind(spec),
            "source": spec.get("source"),
            "policy": spec.get("order", "sequential"),
            "rate_limit": spec.get("rate_limit"),
            "batch_size": int(spec.get("batch_size") or self.batch_size),
            "stop_at": spec.get("stop_at"),
            "engine": engine,
            "workers": (spec.get("workers") or self.ray.workers) if engine == "ray" else None,
            "owner": job.owner,
            "done": done,
            "total": total,
            "skipped": n_skip,
            "skipped_examples": [{"external_id": e, "reason": r} for e, r in examples],
            "fraction": done / total if total else 1.0,
            "rate": round(rate, 2) if rate else None,
            "eta_seconds": round(left / rate, 2) if rate else (0.0 if left == 0 else None),
            "reembedded": live.reembedded,
            "active_seconds": round(live.active_seconds, 3),
            "ordering_seconds": None if live.ordering_seconds is None else round(live.ordering_seconds, 3),
            "seconds_by_stage": {k: round(v, 3) for k, v in live.stages.items()},
            "can_activate": can_activate,
            "error": job.error,
            "created_at": job.created_at.isoformat(),
            "updated_at": job.updated_at.isoformat(),
        }

    # ------------------------------------------------------------------ the worker thread
    def _main(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                try:
                    job = self._next_job()
                except GalleryClosed:
                    return
                except (
                    Exception
                ):  # e.g. the database is briefly unreachable: try again later, keep the thread
                    log.exception("backfill runner: cannot list jobs")
                    job = None
                if job is None:
                    self._cond.wait(self.idle_poll_s)
                    continue
            lease = self._lease = _Lease(self.gallery, job.id, self.owner, self.lease_s)
            try:
                self._run(job)
            except GalleryClosed:
                return
            except Exception as e:
                log.exception("backfill job %d failed", job.id)
                try:
                    with self._cond:
                        # a job whose lease went to another replica is that replica's to fail or finish
                        if not lease.lost and self.gallery.backfill.get_job(job.id).status == "running":
                            self.gallery.backfill.update_job(
                                job.id,
                                status="failed",
                                error=self.registry.public(f"{type(e).__name__}: {e}"),
                                release=self.owner,
                            )
                except Exception:  # the job stays running in SQL: it is retried on the next turn
                    log.exception("backfill job %d: cannot record the failure", job.id)
                    with self._cond:
                        self._cond.wait(self.idle_poll_s)
            finally:  # the job left running here (or this runner stops): another replica may take it now
                self._lease = None
                lease.release()

    def _next_job(self) -> BackfillJobInfo | None:
        """The oldest running job, else the oldest pending one (then marked running), among those this
        runner can claim (no other replica holds their lease) and run. Under the lock."""
        book = self.gallery.backfill
        for status in ("running", "pending"):
            for j in book.list_jobs():
                if j.status != status or not self._can_run(j):
                    continue
                if not book.claim_job(j.id, self.owner, self.lease_s):
                    continue  # another replica runs it
                j = book.get_job(j.id)  # a control call of another replica may have come meanwhile
                if j.status == "pending":
                    return book.update_job(j.id, status="running")
                if j.status == "running":
                    return j
                book.release_job(j.id, self.owner)
        return None

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, woken early by a control call or stop (pacing a rate-limited job)."""
        with self._cond:
            if not self._stopping:
                self._cond.wait(seconds)

    def _can_run(self, job: BackfillJobInfo) -> bool:
        """A Ray job is left to replicas that have Ray installed (create() refused it where none is)."""
        return (job.policy or {}).get("engine", "local") != "ray" or ray_installed()

    def _status(self, job_id: int) -> BackfillJobInfo | None:
        """The job as it is now, or None when the thread must leave it (stopping, not running, or its lease
        taken over by another replica). Renews the lease."""
        with self._cond:
            if self._stopping:
                return None
            if self._lease is not None and not self._lease.renew():
                return None
            job = self.gallery.backfill.get_job(job_id)
            return job if job.status == "running" else None

    def _save_progress(self, job_id: int, done: int, total: int) -> None:
        """Write the job row's counters, unless its lease went to another replica (its counters win)."""
        if self._lease is not None and self._lease.lost:
            return
        self.gallery.backfill.update_job(job_id, done=done, total=total)

    @contextmanager
    def _lease_kept(self) -> Iterator[None]:
        """Keep the current job's lease from a helper thread while a step without batches runs."""
        if self._lease is None:
            yield
            return
        with self._lease.kept():
            yield

    def _finish(self, job_id: int, status: str, done: int, total: int, error: str | None = None) -> None:
        """Leave a job with ``status`` (done, failed, paused at its stop point) and give its lease up in the
        same transaction."""
        with self._cond:
            if self.gallery.backfill.get_job(job_id).status == "running":
                self.gallery.backfill.update_job(
                    job_id, status=status, done=done, total=total, error=error, release=self.owner
                )
            else:
                self.gallery.backfill.update_job(job_id, done=done, total=total, release=self.owner)

    def _run(self, job: BackfillJobInfo) -> None:
        live = self._live.setdefault(job.id, JobProgress())
        live.window.clear()
        started = time.monotonic()
        try:
            self._run_batches(job, live)
        finally:
            live.active_seconds += time.monotonic() - started
            live.phase = None
            live.done = live.total = None

    def _run_batches(self, job: BackfillJobInfo, live: JobProgress) -> None:
        candidate = job.candidate
        spec = dict(job.policy or {})
        if job_kind(spec) == "transform":  # no model runs: the transform maps stored vectors
            run_transform(self, job, live, self.transforms.get(candidate, str(spec["source"])))
            return
        loaded = self.models.get_or_none(candidate)
        if loaded is None:
            raise ModelCardError(f"the candidate {candidate} cannot be loaded from the models dir")
        ordered = spec.get("order") == "uncertainty"
        if ordered and "ordered_items" not in spec:
            live.phase = "ordering"
            space = self.swap.serving_space()
            with self._lease_kept():
                order = (
                    uncertainty_order(self.gallery, space, self.models.get_or_none, loaded) if space else None
                )
            n = (
                self.gallery.backfill.set_order(job.id, order.item_ids.tolist(), order.scores.tolist())
                if order
                else 0
            )
            live.ordering_seconds = order.seconds if order else 0.0
            spec.update(ordered_items=n, order_space=space, unscored=order.unscored if order else 0)
            self.gallery.backfill.update_job(job.id, policy=spec)
            log.info(
                "backfill job %d: ordered %d items of space %s in %.2fs",
                job.id,
                n,
                space,
                live.ordering_seconds,
            )
        live.phase = "embedding"
        cursor = PendingCursor(self.gallery, job.id, candidate, ordered)
        done, total = self.gallery.backfill.progress(candidate)
        self.gallery.backfill.update_job(job.id, done=done, total=total)
        live.done, live.total = done, total
        if spec.get("engine") == "ray":
            from service.backfill.ray_engine import run_ray  # imports ray: only for Ray jobs

            run_ray(self, job, live, cursor, loaded, done, total)
            return
        saved_at = time.monotonic()
        prep = loaded.preprocess
        paced_from, paced_items, paced_rate = time.monotonic(), 0, None
        ahead: Future[_Batch | None] | None = None  # the next batch, read while this one is embedded
        try:
            while True:
                current = self._status(job.id)
                if current is None:  # paused, cancelled or stopping: leave the row's counters exact
                    self._save_progress(job.id, done, total)
                    return
                spec = current.policy or {}
                rate = spec.get("rate_limit")
                if rate != paced_rate:  # a new cap (resume) restarts the pacing clock
                    paced_from, paced_items, paced_rate = time.monotonic(), 0, rate
                if rate:
                    sleep_s = paced_from + paced_items / rate - time.monotonic()
                    if sleep_s > 0:
                        with self._cond:
                            if not self._stopping:
                                self._cond.wait(sleep_s)  # control calls notify: re-check the status at once
                        continue
                limit = int(spec.get("batch_size") or self.batch_size)
                if rate:
                    limit = min(
                        limit, max(1, int(rate / 4))
                    )  # ~0.25 s of budget per batch: smooth, responsive
                stop_at = spec.get("stop_at")
                if stop_at:
                    target = math.ceil(stop_at * total - 1e-9)
                    if done >= target:
                        log.info(
                            "backfill job %d: reached its stop point %.3f (%d/%d)",
                            job.id,
                            stop_at,
                            done,
                            total,
                        )
                        self._finish(job.id, "paused", done, total)
                        return
                    limit = min(limit, target - done)
                batch = ahead.result() if ahead is not None and ahead.result() is not None else None
                ahead = None
                if (
                    batch is not None and batch.size > limit
                ):  # a new stop point or rate since it was read ahead
                    batch = None
                    cursor = PendingCursor(self.gallery, job.id, candidate, ordered)
                if batch is None:
                    t0 = time.perf_counter()
                    rows = cursor.next(limit)
                    live.timed("list", t0)
                    batch = self._load(rows, candidate, prep, live)
                if batch.size == 0:
                    self._complete(job, live)
                    return
                next_limit = (
                    limit
                    if not stop_at
                    else min(limit, math.ceil(stop_at * total - 1e-9) - done - batch.size)
                )
                if not rate and next_limit > 0:
                    # Overlap listing, reading and decoding the next batch with this one's embedding and commit.
                    ahead = self._pool.submit(self._read_ahead, cursor, next_limit, candidate, prep, live)
                n_ok, n_skip = self._store(job.id, candidate, batch, loaded, live)
                done, total, saved_at = self._account(job, live, done, n_ok, n_skip, saved_at)
                paced_items += n_ok + n_skip
        finally:
            if ahead is not None:  # a batch read ahead is not committed: drop it, once its reads finish
                wait([ahead])

    def _complete(self, job: BackfillJobInfo, live: JobProgress) -> None:
        """No pending item is left: the job is done, or failed when every item it had was skipped."""
        done, total = self.gallery.backfill.progress(job.candidate, job_kind(job.policy))
        n_skip = self.gallery.backfill.skips(job.id, 0)[0]
        if n_skip and not live.reembedded:
            # nothing was re-embedded though items were pending: not "done" (nothing was)
            why = (
                f"no item had a usable source ({n_skip} skipped): nothing was re-embedded; "
                "see skipped_examples, ingest the items again (or keep sources), then start a "
                "new job"
            )
            log.warning("backfill job %d: %s", job.id, why)
            self._finish(job.id, "failed", done, total, error=why)
            return
        log.info("backfill job %d: complete, %d/%d embedded by %s", job.id, done, total, job.candidate)
        self._finish(job.id, "done", done, total)

    def _account(
        self, job: BackfillJobInfo, live: JobProgress, done: int, n_ok: int, n_skip: int, saved_at: float
    ) -> tuple[int, int, float]:
        """Count a written batch; rewrite the job row's counters every PROGRESS_EVERY_S.
        Returns ``(done, total, saved_at)``."""
        done += n_ok
        total = self.gallery.live_counts(job.space)[0]
        live.done, live.total = done, total
        live.reembedded += n_ok
        live.tick(n_ok + n_skip)
        if time.monotonic() - saved_at >= PROGRESS_EVERY_S:
            self.gallery.backfill.update_job(job.id, done=done, total=total)
            saved_at = time.monotonic()
        return done, total, saved_at

    def _read_ahead(
        self, cursor: PendingCursor, limit: int, candidate: str, prep: Any, live: JobProgress
    ) -> _Batch | None:
        t0 = time.perf_counter()
        rows = cursor.next(limit, rewind_ok=False)  # never rewinds past the batch in flight
        live.timed("list", t0)
        return None if rows is None else self._load(rows, candidate, prep, live)

    def _load(
        self, rows: list[tuple[int, str, str | None]] | None, candidate: str, prep: Any, live: JobProgress
    ) -> _Batch:
        """Read and decode the sources of ``rows`` (``(item_id, external_id, source_uri)``); items without a
        usable source become skips."""
        t0 = time.perf_counter()
        batch = _Batch(size=len(rows or []))
        for iid, eid, uri in rows or []:
            got = read_source(
                self.blobs,
                uri,
                prep=prep,
                max_pixels=self.max_image_pixels,
                external_id=eid,
                candidate=candidate,
            )
            if isinstance(got, str):
                batch.skips.append((iid, got))
            else:
                batch.images.append(got)
                batch.eids.append(eid)
        live.timed("read_decode", t0)
        return batch

    def _store(
        self, job_id: int, candidate: str, batch: _Batch, loaded: LoadedModel, live: JobProgress
    ) -> tuple[int, int]:
        """Embed a batch and commit it (``gallery.reembed``: SQL, then FAISS); record its skips (they leave
        the job's pending list). Returns ``(re-embedded, skipped)``."""
        pairs: list[tuple[str, np.ndarray]] = []
        with self._lease_kept():  # a large batch may embed for longer than the lease
            if batch.eids:
                t0 = time.perf_counter()
                vectors = embed_images(loaded, np.stack(batch.images))  # (b, D)
                live.timed("embed", t0)
                pairs = list(zip(batch.eids, vectors, strict=True))
            return self._write(job_id, candidate, pairs, batch.skips, live)

    def _write_mapped(
        self, job_id: int, candidate: str, item_ids: list[int], eids: list[str], vectors: np.ndarray
    ) -> int:
        """Commit a transform job's batch (``gallery.write_item_vectors``: one SQL transaction fenced by
        the lease, then FAISS); returns the items written (0 when the lease was lost)."""
        lease = JobLease(job_id, self._lease.owner, self._lease.lease_s) if self._lease is not None else None
        try:
            return self.gallery.write_item_vectors(
                item_ids, eids, vectors, candidate, route=ROUTE_TRANSFORM, lease=lease
            )
        except LeaseLost:
            assert self._lease is not None
            self._lease.lost = True
            log.warning("backfill job %d: its lease went to another replica; batch dropped", job_id)
            return 0

    def _write(
        self,
        job_id: int,
        candidate: str,
        pairs: list[tuple[str, np.ndarray]],
        skips: list[tuple[int, str]],
        live: JobProgress,
        route: str = ROUTE_MODEL,
    ) -> tuple[int, int]:
        """Commit embedded items (``(external_id, (D,) vector)``; ``gallery.reembed``: one SQL transaction
        that also takes them off the pending list, then FAISS) and record skips. Both engines and the
        transform job (``route`` transform) write here. Returns ``(re-embedded, skipped)``."""
        t0 = time.perf_counter()
        n = 0
        # fenced by the lease: if another replica took the job over, nothing of this batch is written
        lease = JobLease(job_id, self._lease.owner, self._lease.lease_s) if self._lease is not None else None
        if pairs:
            try:
                try:
                    self.gallery.reembed(pairs, candidate, lease=lease, route=route)
                except ItemNotFound as e:  # deleted since they were listed: nothing written, retry without
                    gone = set(e.ids)
                    pairs = [p for p in pairs if p[0] not in gone]
                    if pairs:
                        self.gallery.reembed(pairs, candidate, lease=lease, route=route)
            except LeaseLost:
                assert self._lease is not None
                self._lease.lost = True
                log.warning("backfill job %d: its lease went to another replica; batch dropped", job_id)
                return 0, 0
            n = len(pairs)
            if self.on_embedded is not None:
                self.on_embedded(candidate, n)
        if skips:
            try:
                self.gallery.backfill.record_skips(job_id, skips)
            except IntegrityError:  # an item was deleted meanwhile
                alive = self.gallery.items_by_id([i for i, _ in skips])
                self.gallery.backfill.record_skips(job_id, [(i, r) for i, r in skips if i in alive])
        live.timed("write", t0)
        return n, len(skips)
