"""The Ray engine of backfill jobs: embedding on a Ray Data actor pool, writing in the service.

The runner's thread lists pending items with its cursor, as the local engine does, a chunk at a time (up to
``RayOptions.chunk_items`` rows, never past the job's stop point). A chunk becomes one ``ray.data`` dataset of
``(item_id, external_id, source_uri)`` rows, in blocks of a few write batches, mapped by ``map_batches`` on an
actor pool of ``workers`` actors (:class:`EmbedActor`): each loads the candidate once from the models dir,
reads the sources from the blob store, decodes and embeds them, torch on one thread. Item ids and vectors come
back to the thread (``iter_batches``), which writes each batch through the runner's own exactly-once path
(``gallery.reembed``: an item leaves the pending list in the transaction that stores its vector) with the
same skips. Between written batches the thread re-reads the job (pause, cancel, a lost lease: it stops
consuming the dataset, whose actors then exit), paces writes by the rate cap, and counts progress.

Faults: actors restart and their tasks are retried (``max_restarts``, ``max_task_retries``), so a killed worker
costs a retry, not the job. Should a dataset fail anyway, the chunk is listed again from the database (what was
written is no longer pending) up to ``CHUNK_ATTEMPTS`` times. An item seen twice in a run (a retried task whose
first output arrived) is written once.

Where it runs: ``address`` None starts a local Ray cluster in this process (``ray.init``, once); otherwise it
connects to that cluster, one per process. A job may name only the server's own address or one of its allowed
ones (``RayOptions``): the driver unpickles what the cluster sends back, so it connects only to clusters its
operator trusts. Every Ray worker must see the models dir and the blob store at the same paths as the
service (a shared filesystem), and have graceful installed: the actors read both, and nothing else travels.
Ray is an optional extra (``pip install graceful[ray]``): this module imports it only inside functions.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from service.backfill.job_host import JobHost
from service.backfill.pending import PendingCursor
from service.backfill.progress import JobProgress
from service.errors import BadRequest

if TYPE_CHECKING:
    import threading
    from contextlib import AbstractContextManager

    from index import Gallery
    from index.backfill import BackfillJobInfo
    from service.blobs import BlobStore
    from trainer import LoadedModel

log = logging.getLogger(__name__)


class JobRunner(JobHost, Protocol):
    """What a Ray job uses of the runner that runs it (:class:`~service.backfill.runner.BackfillRunner`):
    its parts, its control and lease checks, and its one write path. A protocol, so this module does not
    import the runner, which imports it."""

    ray: RayOptions
    gallery: Gallery
    blobs: BlobStore
    batch_size: int
    max_image_pixels: int
    _cond: threading.Condition
    _stopping: bool

    def _lease_kept(self) -> AbstractContextManager[None]: ...


ENGINES = ("local", "ray")
INSTALL_HINT = "pip install graceful[ray]"
CHUNK_ATTEMPTS = 3  # datasets of one run that may fail (after Ray's own retries) before the job fails
MAX_RESTARTS = 8  # per actor: a crash-looping model fails the job instead of spinning forever
MAX_TASK_RETRIES = 4


class RayUnavailable(BadRequest):
    """A Ray backfill was asked where Ray is not installed."""


class RayAddressRefused(BadRequest):
    """A Ray backfill named a cluster this server may not connect to, or another than the one it is on."""


@dataclass(frozen=True)
class RayOptions:
    """How Ray jobs run: the cluster (``address`` None: a local one started here), actors per job when the
    job names none (``GRACEFUL_RAY_WORKERS``), rows per dataset, and the actor class (tests slow it down)."""

    address: str | None = None
    allowed_addresses: tuple[str, ...] = ()  # further clusters a job may name (besides ``address``)
    workers: int = 2
    chunk_items: int = 50_000  # rows listed per dataset: each dataset starts its own actor pool (seconds)
    object_store_memory: int | None = None  # bytes, a local cluster only (None: Ray's default)
    actor: type | None = None  # None: EmbedActor

    @classmethod
    def from_settings(cls, settings: Any) -> RayOptions:
        """From the service's settings (``ray_address``, ``ray_allowed_addresses``, ``ray_workers``)."""
        allowed = tuple(a.strip() for a in (settings.ray_allowed_addresses or "").split(",") if a.strip())
        return cls(address=settings.ray_address, allowed_addresses=allowed, workers=settings.ray_workers)

    def check_address(self, address: str | None) -> None:
        """:class:`RayAddressRefused` unless a job may name ``address`` (None: the server's own)."""
        if address is not None and address != self.address and address not in self.allowed_addresses:
            raise RayAddressRefused(
                f"Ray address {address!r} is not one this server may connect to: set it as GRACEFUL_RAY_ADDRESS "
                "or list it in GRACEFUL_RAY_ALLOWED_ADDRESSES (the server unpickles what the cluster sends "
                "back, so it connects only to clusters its operator trusts), or leave address unset"
            )


_connected: list[str | None] = []  # the address ensure_ray initialised Ray with (empty: not by it)


@cache
def ray_installed() -> bool:
    """Whether ``ray`` can be imported here (without importing it: that takes seconds)."""
    return importlib.util.find_spec("ray") is not None


def require_ray() -> None:
    """:class:`RayUnavailable`, saying how to install it, unless Ray is installed."""
    if not ray_installed():
        raise RayUnavailable(
            f"engine 'ray' needs Ray, which is not installed on this server: {INSTALL_HINT} "
            "(or use engine 'local')"
        )


def ensure_ray(address: str | None, workers: int, object_store_memory: int | None = None) -> None:
    """Initialise Ray once per process: connect to ``address``, or (None) start a local cluster with at
    least ``workers`` CPUs. Already initialised: kept as it is (one cluster per process)."""
    try:
        import ray
    except ImportError as e:
        raise RayUnavailable(f"engine 'ray' needs Ray ({e}): {INSTALL_HINT}") from None
    if ray.is_initialized():
        if _connected and address is not None and address != _connected[0]:
            raise RayAddressRefused(
                f"this server is connected to Ray at {_connected[0] or 'its local cluster'}, not {address!r}: "
                "one cluster per process (restart the server to change it)"
            )
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": False,  # actor output stays in Ray's session logs, not the service's stderr
    }
    if address is None:
        # this machine's cores, whatever a request asked: the pool is then cut to fit (_workers)
        kwargs["num_cpus"] = os.cpu_count() or 1
        if object_store_memory is not None:
            kwargs["object_store_memory"] = object_store_memory
    else:
        kwargs["address"] = address
    log.info("starting Ray (%s)", address or "a local cluster")
    ray.init(**kwargs)
    _connected[:] = [address]


def shutdown_ray() -> None:
    """Disconnect from Ray (a local cluster stops) if :func:`ensure_ray` connected; else nothing."""
    if not _connected:
        return
    import ray

    ray.shutdown()
    _connected.clear()


class EmbedActor:
    """One actor of the pool (runs in a Ray worker): holds the candidate, embeds batches of rows.

    ``__call__`` takes ``{"item_id": (n,) int64, "external_id": (n,) str, "source_uri": (n,) str}`` and
    returns the same ids with ``vector`` (n, D) float32 (zeros where skipped), ``ok`` (n,) bool and
    ``reason`` (n,) str (why an item is skipped, "" when ok)."""

    def __init__(self, model_folder: str, blobs_root: str, max_pixels: int, threads: int = 1) -> None:
        import torch

        from service.blobs import BlobStore
        from trainer import load_model

        torch.set_num_threads(threads)  # one core per actor: the pool's size is the parallelism
        self.loaded = load_model(model_folder)
        self.prep = self.loaded.preprocess
        self.blobs = BlobStore(Path(blobs_root))
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from service.backfill.sources import read_source
        from trainer import embed_images

        ids, eids, uris = batch["item_id"], batch["external_id"], batch["source_uri"]
        n = len(ids)
        images, rows, reasons = [], [], [""] * n
        for r in range(n):
            got = read_source(
                self.blobs,
                str(uris[r]),
                prep=self.prep,
                max_pixels=self.max_pixels,
                external_id=str(eids[r]),
                candidate=self.loaded.version,
            )
            if isinstance(got, str):
                reasons[r] = got
            else:
                images.append(got)
                rows.append(r)
        vectors = np.zeros((n, self.loaded.card.embedding_dim), np.float32)
        if images:
            vectors[rows] = embed_images(self.loaded, np.stack(images))  # (b, D)
        ok = np.zeros(n, bool)
        ok[rows] = True
        return {
            "item_id": np.asarray(ids, np.int64),
            "external_id": np.asarray(eids, dtype=object),
            "vector": vectors,
            "ok": ok,
            "reason": np.asarray(reasons, dtype=object),
        }


def _workers(asked: int) -> int:
    """``asked`` bounded by the cluster's CPUs: an actor pool larger than the cluster would wait forever."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    if cpus and asked > cpus:
        log.warning("backfill on Ray: %d workers asked, the cluster has %d CPUs: using %d", asked, cpus, cpus)
        return cpus
    return asked


def _dataset(rows: list[tuple[int, str, str | None]], ordered: bool, write_size: int, opts: dict[str, Any]):
    """The chunk as a dataset mapped by the actor pool (lazy: nothing runs until it is iterated)."""
    import ray.data

    # Blocks (one actor task each) of a few write batches: an output reaches the writer as soon as its block
    # is embedded. A small chunk is cut finer, into about 4 blocks per actor, or one actor would do it all.
    per_block = min(4 * write_size, max(1, math.ceil(len(rows) / (4 * opts["workers"]))))
    ds = ray.data.from_items(
        [{"item_id": i, "external_id": e, "source_uri": u} for i, e, u in rows],
        override_num_blocks=math.ceil(len(rows) / per_block),
    )
    ds.context.enable_progress_bars = False
    # an ordered job writes its chunk in its order; otherwise blocks come back as soon as they are done
    ds.context.execution_options.preserve_order = ordered
    with warnings.catch_warnings():
        # Ray 2.60 marks actor restart/retry options "deprecated" as loose kwargs, and has no other place
        warnings.simplefilter("ignore", DeprecationWarning)
        return ds.map_batches(
            opts["actor"],
            fn_constructor_kwargs=opts["ctor"],
            # no larger than a block: Ray Data would otherwise bundle blocks into one task
            batch_size=min(write_size, per_block),
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=opts["workers"]),
            num_cpus=1,
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES,
        )


def run_ray(
    runner: JobRunner,
    job: BackfillJobInfo,
    live: JobProgress,
    cursor: PendingCursor,
    loaded: LoadedModel,
    done: int,
    total: int,
) -> None:
    """Run ``job`` (status running, lease held) on Ray until it is done, failed, paused (by control or its
    stop point), cancelled, or the runner stops; the same bookkeeping as the local engine."""
    import ray

    spec = dict(job.policy or {})
    options = runner.ray
    # the replica that accepted the job checked its address; this one may trust other clusters (or none)
    options.check_address(spec.get("address"))
    with runner._lease_kept():  # starting (or connecting to) a cluster takes seconds
        ensure_ray(
            spec.get("address") or options.address,
            int(spec.get("workers") or options.workers),
            options.object_store_memory,
        )
        workers = _workers(int(spec.get("workers") or options.workers))
    ordered = spec.get("order") == "uncertainty"
    opts = {
        "actor": options.actor or EmbedActor,
        "workers": workers,
        "ctor": {
            "model_folder": str(Path(loaded.path).resolve()),
            "blobs_root": str(Path(runner.blobs.root).resolve()),
            "max_pixels": runner.max_image_pixels,
        },
    }
    saved_at = time.monotonic()
    paced_from, paced_items, paced_rate = time.monotonic(), 0, None
    failures = 0
    while True:
        current = runner._status(job.id)
        if current is None:  # paused, cancelled, stopping or lease lost: leave the row's counters exact
            runner._save_progress(job.id, done, total)
            return
        spec = current.policy or {}
        stop_at = spec.get("stop_at")
        limit = options.chunk_items
        if stop_at:
            target = math.ceil(stop_at * total - 1e-9)
            if done >= target:
                log.info("backfill job %d: reached its stop point %.3f (%d/%d)", job.id, stop_at, done, total)
                runner._finish(job.id, "paused", done, total)
                return
            limit = min(limit, target - done)
        t0 = time.perf_counter()
        rows = cursor.next(limit)  # nothing is in flight between chunks: a rewind is always allowed
        live.timed("list", t0)
        if not rows:
            runner._complete(job, live)
            return
        # no source kept: skipped here, not shipped to an actor
        skips = [(i, "no source kept (ingested while keep_sources was off)") for i, _, u in rows if u is None]
        if skips:
            n_ok, n_skip = runner._write(job.id, job.candidate, [], skips, live)
            done, total, saved_at = runner._account(job, live, done, n_ok, n_skip, saved_at)
            paced_items += n_skip
        ship = [r for r in rows if r[2] is not None]
        if not ship:
            continue
        write_size = int(spec.get("batch_size") or runner.batch_size)
        rate = spec.get("rate_limit")
        if rate:
            write_size = min(write_size, max(1, int(rate / 4)))  # ~0.25 s of budget per write, as local
        seen: set[int] = set()
        batches = None
        try:
            with runner._lease_kept():  # the pool starts, and restarts killed actors, between batches
                ds = _dataset(ship, ordered, write_size, opts)
                batches = iter(ds.iter_batches(batch_size=write_size, batch_format="numpy"))
                while True:
                    t0 = time.perf_counter()
                    batch = next(batches, None)
                    live.timed("embed", t0)  # waiting for the pool: its embedding beyond what overlaps
                    if batch is None:
                        break
                    while True:  # control and pacing before each write
                        current = runner._status(job.id)
                        if current is None:
                            runner._save_progress(job.id, done, total)
                            return
                        rate = (current.policy or {}).get("rate_limit")
                        if rate != paced_rate:  # a new cap restarts the pacing clock
                            paced_from, paced_items, paced_rate = time.monotonic(), 0, rate
                        sleep_s = paced_from + paced_items / rate - time.monotonic() if rate else 0.0
                        if sleep_s <= 0:
                            break
                        with runner._cond:
                            if not runner._stopping:
                                runner._cond.wait(sleep_s)  # control calls notify: re-check at once
                    pairs, bad = [], []
                    for iid, eid, vec, ok, why in zip(
                        batch["item_id"],
                        batch["external_id"],
                        batch["vector"],
                        batch["ok"],
                        batch["reason"],
                        strict=True,
                    ):
                        iid = int(iid)
                        if iid in seen:  # a retried task's duplicate: already written once
                            log.warning("backfill job %d: item %d came back twice; written once", job.id, iid)
                            continue
                        seen.add(iid)
                        if ok:
                            pairs.append((str(eid), np.asarray(vec, np.float32)))
                        else:
                            bad.append((iid, str(why)))
                    n_ok, n_skip = runner._write(job.id, job.candidate, pairs, bad, live)
                    done, total, saved_at = runner._account(job, live, done, n_ok, n_skip, saved_at)
                    paced_items += n_ok + n_skip
        except ray.exceptions.RayError as e:
            failures += 1
            if failures >= CHUNK_ATTEMPTS:
                raise
            log.warning(
                "backfill job %d: the Ray dataset failed (%s); listing the chunk again (attempt %d of %d)",
                job.id,
                str(e).splitlines()[0][:200],
                failures + 1,
                CHUNK_ATTEMPTS,
            )
            # what was written left the pending list; the rest is listed again from the start
            cursor = PendingCursor(runner.gallery, job.id, job.candidate, ordered)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:  # stop the dataset's execution: its actors exit
                close()
