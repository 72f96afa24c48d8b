"""Backfill bookkeeping of a gallery (``Gallery.backfill``): jobs, their progress, pending items, stored
orders and skips, each call one SQL transaction or read. The SQL itself is in :mod:`index.backfill`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sqlalchemy import Engine

from . import backfill
from .types import VersionInfo


class BackfillBook:
    """The backfill side of one open gallery."""

    def __init__(
        self,
        engine: Engine,
        check_open: Callable[[], None],
        version: Callable[[str], VersionInfo],
        dim: Callable[[str], int],
    ) -> None:
        self._engine, self._check_open, self._version, self._dim = engine, check_open, version, dim

    # ------------------------------------------------------------------ jobs
    def create_job(self, candidate: str, policy: Any = None) -> backfill.BackfillJobInfo:
        self._check_open()
        info = self._version(candidate)
        with self._engine.begin() as conn:
            return backfill.create_job(conn, info, policy)

    def get_job(self, job_id: int) -> backfill.BackfillJobInfo:
        self._check_open()
        with self._engine.connect() as conn:
            return backfill.get_job(conn, job_id)

    def list_jobs(self, candidate: str | None = None) -> list[backfill.BackfillJobInfo]:
        self._check_open()
        with self._engine.connect() as conn:
            return backfill.list_jobs(conn, candidate)

    def update_job(self, job_id: int, **changes: Any) -> backfill.BackfillJobInfo:
        """Update ``status``, ``done``, ``total``, ``error`` and/or ``policy`` of a job."""
        self._check_open()
        with self._engine.begin() as conn:
            return backfill.update_job(conn, job_id, **changes)

    # ------------------------------------------------------------------ leases (several replicas, one database)
    def claim_job(self, job_id: int, owner: str, lease_s: float) -> bool:
        """Take or keep a job's lease for ``lease_s`` seconds; True when ``owner`` holds it now (atomic)."""
        self._check_open()
        with self._engine.begin() as conn:
            return backfill.claim_job(conn, int(job_id), owner, float(lease_s))

    def renew_lease(self, job_id: int, owner: str, lease_s: float) -> bool:
        """Extend ``owner``'s lease by ``lease_s`` seconds from now; False when another replica holds it."""
        self._check_open()
        with self._engine.begin() as conn:
            return backfill.renew_lease(conn, int(job_id), owner, float(lease_s))

    def release_job(self, job_id: int, owner: str) -> bool:
        """Give up ``owner``'s lease of a job (False when it did not hold it)."""
        self._check_open()
        with self._engine.begin() as conn:
            return backfill.release_job(conn, int(job_id), owner)

    # ------------------------------------------------------------------ progress and pending items
    def progress(self, candidate: str, kind: str = "image") -> tuple[int, int]:
        """``(done, total)``: items done by ``candidate`` in its space for a job of ``kind`` (``image``:
        embedded by it; ``transform``: embedded or transformed into its space), and all items."""
        self._check_open()
        info = self._version(candidate)
        with self._engine.connect() as conn:
            return backfill.progress(conn, info, kind)

    def pending(
        self,
        candidate: str,
        limit: int,
        after_item_id: int = 0,
        job_id: int | None = None,
        kind: str = "image",
    ) -> list[tuple[int, str, str | None]]:
        """Items not yet done by ``candidate`` for a job of ``kind``: ``(item_id, external_id,
        source_uri)``, by item id (with ``job_id``: also not skipped by that job)."""
        self._check_open()
        info = self._version(candidate)
        with self._engine.connect() as conn:
            return backfill.pending_items(conn, info, int(limit), int(after_item_id), job_id, kind)

    def pending_vectors(
        self,
        candidate: str,
        source_space: str,
        limit: int,
        after_item_id: int = 0,
        job_id: int | None = None,
    ) -> tuple[list[int], list[str], np.ndarray]:
        """A transform job's next items and their stored vectors in ``source_space`` (see
        :func:`index.backfill.pending_vectors`): ``(item_ids, external_ids, vectors (m, d))``."""
        self._check_open()
        info = self._version(candidate)
        dim = self._dim(source_space)
        with self._engine.connect() as conn:
            return backfill.pending_vectors(
                conn, info, source_space, dim, int(limit), int(after_item_id), job_id
            )

    def pending_without_vector(
        self, candidate: str, source_space: str, limit: int, job_id: int | None = None
    ) -> list[tuple[int, str]]:
        """Items a transform job cannot do (no stored vector in ``source_space``): ``(item_id, external_id)``."""
        self._check_open()
        info = self._version(candidate)
        with self._engine.connect() as conn:
            return backfill.pending_without_vector(conn, info, source_space, int(limit), job_id)

    def pending_ordered(
        self, job_id: int, candidate: str, limit: int, after_position: int = -1
    ) -> list[tuple[int, int, str, str | None]]:
        """Pending, unskipped items of a job's stored order: ``(position, item_id, external_id, source_uri)``."""
        self._check_open()
        info = self._version(candidate)
        with self._engine.connect() as conn:
            return backfill.pending_in_order(conn, int(job_id), info, int(limit), int(after_position))

    # ------------------------------------------------------------------ orders and skips
    def set_order(self, job_id: int, item_ids: Sequence[int], scores: Sequence[float] | None = None) -> int:
        """Store a job's re-embedding order (one transaction; replaces a previous one). Returns its length."""
        self._check_open()
        with self._engine.begin() as conn:
            backfill.get_job(conn, int(job_id))
            return backfill.write_order(conn, int(job_id), item_ids, scores)

    def order(self, job_id: int) -> list[int]:
        """A job's stored order as item ids (empty if it has none)."""
        self._check_open()
        with self._engine.connect() as conn:
            return backfill.read_order(conn, int(job_id))

    def order_size(self, job_id: int) -> int:
        self._check_open()
        with self._engine.connect() as conn:
            return backfill.order_size(conn, int(job_id))

    def record_skips(self, job_id: int, skips: Sequence[tuple[int, str]]) -> None:
        """Remember items (``(item_id, reason)``) a job could not re-embed; they leave its pending list."""
        self._check_open()
        with self._engine.begin() as conn:
            backfill.record_skips(conn, int(job_id), skips)

    def skips(self, job_id: int, limit: int = 20) -> tuple[int, list[tuple[str, str]]]:
        """``(count, first `limit` (external_id, reason))`` of the items a job skipped."""
        self._check_open()
        with self._engine.connect() as conn:
            return backfill.skipped(conn, int(job_id), int(limit))
