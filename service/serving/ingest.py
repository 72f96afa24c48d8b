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
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select

from index import Gallery, NewItem
from index.errors import GalleryError
from index.tables import Item
from service.blobs import BlobStore
from service.errors import IncompatibleModel, NoActiveModel
from service.images import decode_image
from service.models.hot_swap import ActiveModel, HotSwap
from service.observability import Metrics
from service.schemas import IngestResponse
from service.serving.batching import BatchBounds, MicroBatcher
from service.serving.deadlines import result_within

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
        keep_sources: bool,
    ) -> None:
        self.gallery, self.swap, self.blobs, self.metrics = gallery, swap, blobs, metrics
        self.max_image_pixels, self.keep_sources = max_image_pixels, keep_sources
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

    def start(self, job: IngestJob, deadline: float) -> Awaitable[IngestResponse]:
        """Queue ``job`` with the model active now (the one its answer will name); await the answer."""
        active = self.swap.require_active()
        future = self.batcher.submit((active, job.upsert), job, deadline=deadline)
        return result_within(
            future,
            deadline,
            "the ingest",
            outcome_if_late="it is being written as one transaction and will be stored entirely or not at all: "
            "check GET /v1/items/{external_id} before sending it again (or send it with upsert)",
        )

    def _run_batch(
        self, key: tuple[ActiveModel, bool], jobs: Sequence[IngestJob]
    ) -> list[IngestResponse | Exception]:
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
                                    channels=captured.channels,
                                    size=captured.input_size,
                                    max_pixels=self.max_image_pixels,
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
            write = self.gallery.upsert if upsert else self.gallery.add
            try:
                write([it for i in ok for it in items[i]], captured.version)
            except GalleryError as e:
                if len(ok) == 1:
                    out[ok[0]] = e
                else:  # refused as a group: write each on its own, so each gets its own answer
                    for i in ok:
                        try:
                            write(items[i], captured.version)
                        except GalleryError as e1:
                            out[i] = e1
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


def _spans(jobs: Sequence[IngestJob], ok: list[int]) -> list[tuple[int, int]]:
    """``(job index, position of its first row)`` of the jobs ``ok``, their rows laid end to end."""
    out, pos = [], 0
    for i in ok:
        out.append((i, pos))
        pos += len(jobs[i].rows)
    return out
