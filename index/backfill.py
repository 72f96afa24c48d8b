"""Backfill bookkeeping: jobs that re-embed the gallery with a candidate version.

Per-item progress needs no table of its own: an item is done when its embeddings row in the candidate's
space has ``version == candidate``. A job row records the candidate, its space, a status, the policy it
runs under (free JSON, e.g. batch size or order), and the progress counters a runner updates.
Plain functions over a caller-owned :class:`sqlalchemy.Connection`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, func, select, update

from .errors import InvalidInput
from .tables import BackfillJob, Embedding, Item, utcnow
from .types import VersionInfo

JOB_STATUSES = ("pending", "running", "paused", "cancelled", "done", "failed")

jobs_t = BackfillJob.__table__
items_t = Item.__table__
emb_t = Embedding.__table__


@dataclass(frozen=True)
class BackfillJobInfo:
    id: int
    candidate: str
    space: str
    status: str
    policy: Any
    total: int
    done: int
    error: str | None
    created_at: datetime
    updated_at: datetime


def _info(r: Any) -> BackfillJobInfo:
    return BackfillJobInfo(
        id=int(r.id), candidate=r.candidate, space=r.space, status=r.status, policy=r.policy,
        total=int(r.total), done=int(r.done), error=r.error, created_at=r.created_at, updated_at=r.updated_at,
    )


def progress(conn: Connection, candidate: VersionInfo) -> tuple[int, int]:
    """``(done, total)``: items embedded by ``candidate`` in its space, and all items."""
    done = conn.execute(
        select(func.count()).select_from(emb_t).where(
            emb_t.c.space == candidate.space, emb_t.c.version == candidate.version
        )
    ).scalar_one()
    total = conn.execute(select(func.count()).select_from(items_t)).scalar_one()
    return int(done), int(total)


def pending_items(
    conn: Connection, candidate: VersionInfo, limit: int, after_item_id: int = 0
) -> list[tuple[int, str, str | None]]:
    """Items not yet embedded by ``candidate``: ``(item_id, external_id, source_uri)`` by item id, paged."""
    done = emb_t.alias("done")
    rows = conn.execute(
        select(items_t.c.id, items_t.c.external_id, items_t.c.source_uri)
        .outerjoin(
            done,
            and_(done.c.item_id == items_t.c.id, done.c.space == candidate.space, done.c.version == candidate.version),
        )
        .where(done.c.id.is_(None), items_t.c.id > after_item_id)
        .order_by(items_t.c.id)
        .limit(limit)
    )
    return [(int(i), e, u) for i, e, u in rows]


def create_job(conn: Connection, candidate: VersionInfo, policy: Any = None) -> BackfillJobInfo:
    """A ``pending`` job for ``candidate``; ``total``/``done`` start from the current progress."""
    done, total = progress(conn, candidate)
    now = utcnow()
    job_id = conn.execute(
        jobs_t.insert().returning(jobs_t.c.id).values(
            candidate=candidate.version, space=candidate.space, status="pending", policy=policy,
            total=total, done=done, created_at=now, updated_at=now,
        )
    ).scalar_one()
    return get_job(conn, int(job_id))


def get_job(conn: Connection, job_id: int) -> BackfillJobInfo:
    r = conn.execute(select(jobs_t).where(jobs_t.c.id == job_id)).first()
    if r is None:
        raise InvalidInput(f"unknown backfill job {job_id!r}")
    return _info(r)


def list_jobs(conn: Connection, candidate: str | None = None) -> list[BackfillJobInfo]:
    stmt = select(jobs_t).order_by(jobs_t.c.id)
    if candidate is not None:
        stmt = stmt.where(jobs_t.c.candidate == candidate)
    return [_info(r) for r in conn.execute(stmt)]


def update_job(
    conn: Connection,
    job_id: int,
    *,
    status: str | None = None,
    done: int | None = None,
    total: int | None = None,
    error: str | None = None,
) -> BackfillJobInfo:
    """Update a job's status and/or progress (None leaves a field as it is)."""
    if status is not None and status not in JOB_STATUSES:
        raise InvalidInput(f"backfill status must be one of {JOB_STATUSES}, not {status!r}")
    values: dict[str, Any] = {"updated_at": utcnow()}
    for key, val in (("status", status), ("done", done), ("total", total), ("error", error)):
        if val is not None:
            values[key] = val
    get_job(conn, job_id)
    conn.execute(update(jobs_t).where(jobs_t.c.id == job_id).values(**values))
    return get_job(conn, job_id)

