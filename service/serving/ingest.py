"""The ingest path: concurrent ingest requests share one model forward and one SQL transaction.

Each request stays all-or-nothing: its images are decoded first (a bad one fails that request only); the
grouped write is one transaction, and if it is refused (say two requests in the batch carry the same
external id, or one collides with a stored item) each request is written on its own, so each gets its own
answer. Every item's source bytes are kept before the transaction that references them commits (see
:mod:`service.blobs`); their fsyncs are issued in parallel, which the file system commits as a group.

Sources are kept for what is stored and nothing else: the bytes of a request refused at decoding are never
written, those of a request whose write is refused are removed right after (unless a stored item has the
same bytes: blobs are content-addressed), and :meth:`IngestPath.delete` removes a deleted item's bytes once
no other item references them. Blob writes up to the commit, and the check-then-remove, hold one lock, so a
removal never races an ingest of the same bytes in this process.

Hot swap: the batch's key is the model the requests captured when they started. The writes happen under
the registry's swap read lock, so an activation's check-and-swap cannot interleave; if the active model
changed meanwhile to another embedding space (possible only over an empty or fully backfilled gallery),
the request is refused with 409 rather than writing into a space the gallery no longer serves.

Vectors (:class:`VectorJob`: embeddings computed outside graceful, each request made by one version) take the
same queue, grouped by version: no forward, no sources, one transaction per group with the same per-request
answers. Their version must write into the space the gallery serves, checked under the same read lock.
Images are refused at once while an external version (which embeds none) is active.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from sqlalchemy import select

from index import Gallery, NewItem
from index.errors import GalleryError
from index.tables import Item
from service.blobs import BlobStore
from service.errors import IncompatibleModel, NoActiveModel
from service.images import decode_image
from service.models.hot_swap import ActiveModel, HotSwap, backfill_report_url
from service.observability import Metrics
from service.schemas import IngestResponse
from service.serving.batching import BatchBounds, MicroBatcher
from service.serving.deadlines import result_within
from trainer import NoImageModel

log = logging.getLogger(__name__)

# Parallel fsyncs of source blobs: the file system batches concurrent fsyncs into one journal commit
# (measured here: 4 ms per file one by one, 0.1 ms per file with 8 in flight).
_BLOB_WRITERS = 8


@dataclass(frozen=True, slots=True)
class IngestJob:
    """One ingest request: ``rows`` of (external_id, encoded image bytes, metadata or None)."""

    rows: list[tuple[str, bytes, dict[str, Any] | None]]
    upsert: bool = False

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True, slots=True)
class VectorJob:
    """One ingest request of vectors computed outside graceful: ``rows`` of (external_id, vector, metadata
    or None), every vector made by ``model_version``. Stored as they are (L2-normalised by the gallery):
    no forward, no source bytes."""

    rows: list[tuple[str, list[float], dict[str, Any] | None]]
    model_version: str
    upsert: bool = False

    def __len__(self) -> int:
        return len(self.rows)


class IngestPath:
    """Ingests of one app: owns the ingest micro-batcher and the blob-writer threads."""

    def __init__(
        self,
        gallery: Gallery,
        swap: HotSwap,
        blobs: BlobStore,
        metrics: Metrics,
        bounds: BatchBounds,
        *,
        max_image_pixels: int,
        strict_image_size: bool = False,
        keep_sources: bool,
    ) -> None:
        self.gallery, self.swap, self.blobs, self.metrics = gallery, swap, blobs, metrics
        self.max_image_pixels, self.keep_sources = max_image_pixels, keep_sources
        self.strict_image_size = strict_image_size
        self._pool = ThreadPoolExecutor(_BLOB_WRITERS, thread_name_prefix="blob-writer")
        self._sources = threading.Lock()  # blob writes up to their commit; a blob's check-then-remove
        self.batcher: MicroBatcher = MicroBatcher(
            "ingest",
            self._run_batch,
            max_size=bounds.max_size,
            max_wait_s=bounds.max_wait_s,
            max_queue=bounds.max_queue,
            on_start=bounds.on_start,
            size_of=len,
            on_batch=metrics.batch_size.labels(queue="ingest").observe,
        ).start()

    def close(self) -> None:
        """Stop taking work; queued ingests finish (and commit) first."""
        self.batcher.close()
        self._pool.shutdown(wait=True)

    def arriving(self) -> AbstractContextManager[None]:
        """Around a request from its arrival to :meth:`start` (see :mod:`service.serving.batching`)."""
        return self.batcher.announce()

    def start(self, job: IngestJob | VectorJob, deadline: float) -> Awaitable[IngestResponse]:
        """Queue ``job`` with the model active now (the one an image job's answer will name); await the
        answer. Images while an external version is active: :class:`NoImageModel` at once."""
        active = self.swap.require_active()
        key: tuple = (active, job.upsert)
        if isinstance(job, VectorJob):
            key = (active, job.upsert, job.model_version)  # a group shares one version, one transaction
        elif active.card.external:
            raise NoImageModel(active.version)
        future = self.batcher.submit(key, job, deadline=deadline)
        return result_within(
            future,
            deadline,
            "the ingest",
            outcome_if_late="it is being written as one transaction and will be stored entirely or not at all: "
            "check GET /v1/items/{external_id} before sending it again (or send it with upsert)",
        )

    def _run_batch(self, key: tuple, jobs: Sequence[IngestJob]) -> list[IngestResponse | Exception]:
        if isinstance(jobs[0], VectorJob):
            return self._run_vector_batch(key, jobs)
        captured, upsert = key
        out: list[IngestResponse | Exception | None] = [None] * len(jobs)
        with self.swap.serving():
            active = self.swap.active
            if active is None:
                return [
                    NoActiveModel("no model is active: activate one with POST /v1/models/{version}/activate")
                ] * len(jobs)
            if active.space != captured.space:
                return [
                    IncompatibleModel(
                        f"the active model changed from {captured.version} (space {captured.space!r}) to "
                        f"{active.version} (space {active.space!r}) while this ingest waited; nothing was stored: "
                        f"send it again",
                        candidate=active.version,
                    )
                ] * len(jobs)
            images: list[np.ndarray] = []
            ok: list[int] = []
            for i, job in enumerate(jobs):
                try:
                    images.append(
                        np.stack(
                            [
                                decode_image(
                                    raw,
                                    prep=captured.prep,
                                    max_pixels=self.max_image_pixels,
                                    strict=self.strict_image_size,
                                    what=f"item {eid!r}",
                                )
                                for eid, raw, _ in job.rows
                            ]
                        )
                    )
                    ok.append(i)
                except Exception as e:  # a bad image fails its own request only (and keeps no bytes)
                    out[i] = e
            if ok:
                with self._sources:
                    self._write(captured, upsert, jobs, ok, np.concatenate(images), out)
        stored = [i for i in range(len(jobs)) if out[i] is None]
        self.metrics.embedded.labels(version=captured.version, purpose="ingest").inc(
            sum(len(jobs[i].rows) for i in stored)
        )
        for i in stored:
            out[i] = IngestResponse(
                model_version=captured.version,
                space=captured.space,
                stored=[r[0] for r in jobs[i].rows],
                count=len(jobs[i].rows),
            )
        return out  # type: ignore[return-value]

    def _write(
        self,
        captured: ActiveModel,
        upsert: bool,
        jobs: Sequence[IngestJob],
        ok: list[int],
        images: np.ndarray,
        out: list[IngestResponse | Exception | None],
    ) -> None:
        """Keep the sources of the decoded jobs ``ok`` (written while ``images`` are embedded), write their
        items, and record each refused job's error in ``out``. Sources no stored item references (a refused
        job's, an upsert's replaced ones) are removed before returning. Holds the sources lock."""
        rows = [r for i in ok for r in jobs[i].rows]
        sources = self._keep_sources([raw for _, raw, _ in rows])
        uris: list[str | None] = []
        before: dict[str, str | None] = {}
        failed = True
        try:
            if upsert and self.keep_sources:  # the bytes an upsert replaces may become unreferenced
                before = {
                    eid: rec.source_uri for eid, rec in self.gallery.get_items([r[0] for r in rows]).items()
                }
            vectors = captured.embed(images)  # (rows, d) float32
            uris = sources()
            items: dict[int, list[NewItem]] = {}
            for i, first in _spans(jobs, ok):
                items[i] = [
                    NewItem(
                        external_id=eid, vector=vectors[first + r], metadata=meta, source_uri=uris[first + r]
                    )
                    for r, (eid, _, meta) in enumerate(jobs[i].rows)
                ]
            # the active space is checked again at commit: another replica may have switched it meanwhile
            write = partial(
                self.gallery.upsert if upsert else self.gallery.add, expect_active_space=captured.space
            )
            _write_jobs(write, items, captured.version, out)
            failed = False
        finally:
            if self.keep_sources:
                if not uris:  # failed before they were waited for: their writes must settle before removals
                    uris = sources(missing_ok=True)
                # what was stored keeps its bytes; after an unexpected error, the SQL check alone decides
                kept = (
                    set()
                    if failed
                    else {
                        u
                        for i, first in _spans(jobs, ok)
                        if out[i] is None
                        for u in uris[first : first + len(jobs[i].rows)]
                    }
                )
                dropped = {u for u in (*uris, *before.values()) if u is not None} - kept
                if dropped:
                    self._drop_unreferenced(dropped)

    def _run_vector_batch(
        self, key: tuple[ActiveModel, bool, str], jobs: Sequence[VectorJob]
    ) -> list[IngestResponse | Exception]:
        """Store ``jobs``' vectors as their version's embeddings, in one transaction (each job in its own if
        the group's is refused). The version must be valid and write into the space the gallery serves
        (checked under the swap's read lock, so no activation slips between the check and the write)."""
        _, upsert, version = key
        card = self.swap.registry.entry(version).card  # ModelNotFound / InvalidModel: the whole group
        assert card is not None  # entry() raises for refused folders
        out: list[IngestResponse | Exception | None] = [None] * len(jobs)
        with self.swap.serving():
            active = self.swap.require_active()
            if card.space != active.space:
                raise IncompatibleModel(
                    f"the vectors come from {version}, which writes into space {card.space!r}, but the gallery "
                    f"serves space {active.space!r} (active version {active.version}): they are not comparable "
                    f"with its items; nothing was stored. Send vectors of a version of space {active.space!r}, "
                    f"or re-embed the gallery first (cost: {backfill_report_url(version)})",
                    candidate=version,
                )
            items = {
                i: [
                    NewItem(external_id=eid, vector=np.asarray(vec, dtype=np.float64), metadata=meta)
                    for eid, vec, meta in job.rows
                ]
                for i, job in enumerate(jobs)
            }
            write = partial(
                self.gallery.upsert if upsert else self.gallery.add, expect_active_space=active.space
            )
            _write_jobs(write, items, version, out)
        return [
            e
            if e is not None
            else IngestResponse(
                model_version=version,
                space=card.space,
                stored=[r[0] for r in job.rows],
                count=len(job.rows),
            )
            for e, job in zip(out, jobs, strict=True)
        ]

    def _referenced(self, uris: Collection[str]) -> set[str]:
        """Which of ``uris`` some stored item has as its source (one SQL query; index/ has no lookup by
        source, so this reads its items table directly)."""
        found: set[str] = set()
        listed = list(uris)
        with self.gallery.engine.connect() as conn:
            for s in range(0, len(listed), 500):
                rows = conn.execute(
                    select(Item.source_uri).where(Item.source_uri.in_(listed[s : s + 500])).distinct()
                )
                found.update(u for (u,) in rows if u is not None)
        return found

    def _drop_unreferenced(self, uris: Iterable[str]) -> int:
        """Remove the blobs of ``uris`` that no stored item references. The caller holds the sources lock."""
        uris = set(uris)
        gone = 0
        try:
            for uri in uris - self._referenced(uris):
                gone += self.blobs.delete(uri)
        except Exception:  # a leftover blob is garbage, never an error for the request
            log.exception("could not remove %d unreferenced source blobs", len(uris))
        return gone

    def delete(self, external_ids: Sequence[str]) -> int:
        """Delete items (``Gallery.delete``: unknown ids raise ItemNotFound, nothing deleted), then remove
        their source bytes that no remaining item references. Returns how many items were deleted."""
        records = self.gallery.get_items(external_ids)
        n = self.gallery.delete(external_ids)
        uris = {rec.source_uri for rec in records.values() if rec.source_uri is not None}
        if uris:
            with self._sources:
                self._drop_unreferenced(uris)
        return n

    def delete_many(self, external_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Delete the items that exist among ``external_ids`` (``Gallery.delete_many``: unknown ids are no
        error), then their unreferenced source bytes as :meth:`delete` does. Returns ``(deleted, missing)``."""
        records = self.gallery.get_items(external_ids)
        deleted, missing = self.gallery.delete_many(external_ids)
        gone = set(deleted)
        uris = {rec.source_uri for e, rec in records.items() if e in gone and rec.source_uri is not None}
        if uris:
            with self._sources:
                self._drop_unreferenced(uris)
        return deleted, missing

    def _keep_sources(self, raws: list[bytes]) -> Callable[..., list[str | None]]:
        """Start writing ``raws`` as blobs; returns the function that waits for them and gives their URIs
        (``missing_ok=True``: None for a blob whose write failed, instead of raising)."""
        if not self.keep_sources:
            return lambda missing_ok=False: [None] * len(raws)
        # one write per distinct content (the store is content-addressed; two writers of one blob would race)
        digests = [hashlib.sha256(r).digest() for r in raws]
        unique = dict(zip(digests, raws, strict=True))
        futures = {d: self._pool.submit(self.blobs.put, r) for d, r in unique.items()}

        def wait(missing_ok: bool = False) -> list[str | None]:
            uri_of: dict[bytes, str | None] = {}
            for d, f in futures.items():
                try:
                    uri_of[d] = f.result()
                except Exception:
                    if not missing_ok:
                        raise
                    uri_of[d] = None
            return [uri_of[d] for d in digests]

        return wait


def _write_jobs(
    write: Callable[[list[NewItem], str], Any],
    items: dict[int, list[NewItem]],
    version: str,
    out: list[IngestResponse | Exception | None],
) -> None:
    """Write every job's ``items`` (job index -> its items) as ``version``'s in one transaction; if the
    group is refused (two jobs with one external id, one colliding with a stored item, a bad vector), each
    job is written on its own, so each gets its own answer: a refused job's error lands in ``out``."""
    jobs = list(items)
    try:
        write([it for i in jobs for it in items[i]], version)
    except GalleryError as e:
        if len(jobs) == 1:
            out[jobs[0]] = e
            return
        for i in jobs:
            try:
                write(items[i], version)
            except GalleryError as e1:
                out[i] = e1


def _spans(jobs: Sequence[IngestJob], ok: list[int]) -> list[tuple[int, int]]:
    """``(job index, position of its first row)`` of the jobs ``ok``, their rows laid end to end."""
    out, pos = [], 0
    for i in ok:
        out.append((i, pos))
        pos += len(jobs[i].rows)
    return out
