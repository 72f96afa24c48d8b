"""Backfill bookkeeping: jobs that re-embed the gallery with a candidate version.

Per-item progress needs no table of its own: an item is done when its embeddings row in the candidate's
space has ``version == candidate``. A job row records the candidate, its space, a status, the policy it
runs under (free JSON, e.g. batch size or order), and the progress counters a runner updates.
An ordered job also has its order (``backfill_order``: position -> item, written once); items a job could
not re-embed are in ``backfill_skips``. Pending items are always computed against the embeddings, so a
resumed job skips what was committed before a crash, whatever its counters said.
Several service replicas may share the database: a job runs where its lease is held (``owner``,
``lease_until``; :func:`claim_job`, :func:`renew_lease`, :func:`release_job`), and any replica claims a job
whose lease ran out. Lease times are the replicas' own UTC clocks (portable SQL), so they must agree to well
within a lease.
Plain functions over a caller-owned :class:`sqlalchemy.Connection`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import numpy as np
from sqlalchemy import Connection, Table, and_, delete, func, or_, select, update

from .errors import InvalidInput, UnknownBackfillJob
from .tables import BackfillJob, BackfillOrder, BackfillSkip, Embedding, Item, utcnow
from .types import ROUTE_MODEL, VersionInfo

JOB_STATUSES = ("pending", "running", "paused", "cancelled", "done", "failed")
# ``image``: re-embed each item's source with the candidate; ``transform``: map each item's stored vector of
# another space into the candidate's (no source read). The kind lives in the job's policy JSON.
JOB_KINDS = ("image", "transform")

jobs_t = cast(Table, BackfillJob.__table__)
items_t = cast(Table, Item.__table__)
emb_t = cast(Table, Embedding.__table__)
order_t = cast(Table, BackfillOrder.__table__)
skips_t = cast(Table, BackfillSkip.__table__)

_CHUNK = 500  # portable bound on IN-list sizes and rows per executemany


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
    owner: str | None = None  # the replica holding the job's lease (None: nobody runs it)
    lease_until: datetime | None = None  # UTC


def _info(r: Any) -> BackfillJobInfo:
    return BackfillJobInfo(
        id=int(r.id),
        candidate=r.candidate,
        space=r.space,
        status=r.status,
        policy=r.policy,
        total=int(r.total),
        done=int(r.done),
        error=r.error,
        created_at=r.created_at,
        updated_at=r.updated_at,
        owner=r.owner,
        lease_until=r.lease_until,
    )


def _done_rows(table: Any, candidate: VersionInfo, kind: str) -> Any:
    """The SQL condition of an embeddings row that finishes an item for a job of ``kind``: ``image``
    wants the candidate's own embedding (route ``model``); ``transform`` any vector of the candidate."""
    if kind not in JOB_KINDS:
        raise InvalidInput(f"backfill kind must be one of {', '.join(JOB_KINDS)}, not {kind!r}")
    cond = and_(table.c.space == candidate.space, table.c.version == candidate.version)
    return cond if kind == "transform" else and_(cond, table.c.route == ROUTE_MODEL)


def progress(conn: Connection, candidate: VersionInfo, kind: str = "image") -> tuple[int, int]:
    """``(done, total)``: items whose vector in the candidate's space is done for a job of ``kind``
    (``image``: embedded by ``candidate``; ``transform``: embedded or transformed), and all items."""
    done = conn.execute(
        select(func.count()).select_from(emb_t).where(_done_rows(emb_t, candidate, kind))
    ).scalar_one()
    total = conn.execute(select(func.count()).select_from(items_t)).scalar_one()
    return int(done), int(total)


def _not_done(stmt, candidate: VersionInfo, job_id: int | None, kind: str = "image"):
    """``stmt`` (selecting from items) restricted to items not done by ``candidate`` in its space for a job
    of ``kind`` (see :func:`progress`) and, with ``job_id``, not skipped by that job (anti-joins on the
    unique (item, space) / (job, item) keys)."""
    done = emb_t.alias("done")
    stmt = stmt.outerjoin(
        done, and_(done.c.item_id == items_t.c.id, _done_rows(done, candidate, kind))
    ).where(done.c.id.is_(None))
    if job_id is not None:
        skip = skips_t.alias("skip")
        stmt = stmt.outerjoin(skip, and_(skip.c.item_id == items_t.c.id, skip.c.job_id == job_id)).where(
            skip.c.item_id.is_(None)
        )
    return stmt


def pending_items(
    conn: Connection,
    candidate: VersionInfo,
    limit: int,
    after_item_id: int = 0,
    job_id: int | None = None,
    kind: str = "image",
) -> list[tuple[int, str, str | None]]:
    """Items not yet done by ``candidate`` for a job of ``kind`` (:func:`progress`): ``(item_id,
    external_id, source_uri)`` by item id, paged.

    With ``job_id``, items that job skipped are left out too.
    """
    stmt = select(items_t.c.id, items_t.c.external_id, items_t.c.source_uri).select_from(items_t)
    stmt = (
        _not_done(stmt, candidate, job_id, kind)
        .where(items_t.c.id > after_item_id)
        .order_by(items_t.c.id)
        .limit(limit)
    )
    return [(int(i), e, u) for i, e, u in conn.execute(stmt)]


def pending_vectors(
    conn: Connection,
    candidate: VersionInfo,
    source_space: str,
    dim: int,
    limit: int,
    after_item_id: int = 0,
    job_id: int | None = None,
) -> tuple[list[int], list[str], np.ndarray]:
    """A transform job's next batch: items not yet done by ``candidate`` (kind ``transform``) that have a
    stored vector in ``source_space``, with that vector, by item id after ``after_item_id``: ``(item_ids,
    external_ids, vectors (m, dim) float32)``. One statement (the vector comes with the listing)."""
    src = emb_t.alias("src")
    stmt = select(items_t.c.id, items_t.c.external_id, src.c.vector).select_from(
        items_t.join(src, and_(src.c.item_id == items_t.c.id, src.c.space == source_space))
    )
    stmt = (
        _not_done(stmt, candidate, job_id, "transform")
        .where(items_t.c.id > after_item_id)
        .order_by(items_t.c.id)
        .limit(limit)
    )
    rows = conn.execute(stmt).all()
    vecs = np.frombuffer(b"".join(bytes(r[2]) for r in rows), dtype="<f4").reshape(len(rows), dim)
    return [int(r[0]) for r in rows], [r[1] for r in rows], vecs


def pending_without_vector(
    conn: Connection, candidate: VersionInfo, source_space: str, limit: int, job_id: int | None = None
) -> list[tuple[int, str]]:
    """Items a transform job cannot do: not done by ``candidate`` and without a stored vector in
    ``source_space`` (``(item_id, external_id)``, by item id)."""
    src = emb_t.alias("src")
    stmt = (
        select(items_t.c.id, items_t.c.external_id)
        .select_from(items_t)
        .outerjoin(src, and_(src.c.item_id == items_t.c.id, src.c.space == source_space))
        .where(src.c.id.is_(None))
    )
    stmt = _not_done(stmt, candidate, job_id, "transform").order_by(items_t.c.id).limit(limit)
    return [(int(i), e) for i, e in conn.execute(stmt)]


def write_order(
    conn: Connection, job_id: int, item_ids: Sequence[int], scores: Sequence[float] | None = None
) -> int:
    """Store a job's order: ``item_ids[p]`` is re-embedded p-th. Replaces any previous order of the job."""
    conn.execute(delete(order_t).where(order_t.c.job_id == job_id))
    rows = [
        {
            "job_id": job_id,
            "position": p,
            "item_id": int(i),
            "score": None if scores is None else float(scores[p]),
        }
        for p, i in enumerate(item_ids)
    ]
    for s in range(0, len(rows), _CHUNK * 10):
        conn.execute(order_t.insert(), rows[s : s + _CHUNK * 10])
    return len(rows)


def order_size(conn: Connection, job_id: int) -> int:
    """Rows of a job's order (0: the job has none yet, or follows item ids)."""
    return int(
        conn.execute(select(func.count()).select_from(order_t).where(order_t.c.job_id == job_id)).scalar_one()
    )


def pending_in_order(
    conn: Connection, job_id: int, candidate: VersionInfo, limit: int, after_position: int = -1
) -> list[tuple[int, int, str, str | None]]:
    """Pending, unskipped items of a job's order after ``after_position``:
    ``(position, item_id, external_id, source_uri)`` by position, paged."""
    stmt = select(order_t.c.position, items_t.c.id, items_t.c.external_id, items_t.c.source_uri).select_from(
        order_t.join(items_t, items_t.c.id == order_t.c.item_id)
    )
    stmt = (
        _not_done(stmt, candidate, job_id)
        .where(order_t.c.job_id == job_id, order_t.c.position > after_position)
        .order_by(order_t.c.position)
        .limit(limit)
    )
    return [(int(p), int(i), e, u) for p, i, e, u in conn.execute(stmt)]


def read_order(conn: Connection, job_id: int) -> list[int]:
    """A job's order as item ids, first to last (items deleted since are gone from it)."""
    rows = conn.execute(
        select(order_t.c.item_id).where(order_t.c.job_id == job_id).order_by(order_t.c.position)
    )
    return [int(i) for (i,) in rows]


def record_skips(conn: Connection, job_id: int, skips: Sequence[tuple[int, str]]) -> None:
    """Remember ``(item_id, reason)`` pairs a job could not re-embed (ignores pairs it already holds)."""
    if not skips:
        return
    ids = [int(i) for i, _ in skips]
    have: set[int] = set()
    for s in range(0, len(ids), _CHUNK):
        have.update(
            int(i)
            for (i,) in conn.execute(
                select(skips_t.c.item_id).where(
                    skips_t.c.job_id == job_id, skips_t.c.item_id.in_(ids[s : s + _CHUNK])
                )
            )
        )
    rows = [{"job_id": job_id, "item_id": int(i), "reason": r[:256]} for i, r in skips if int(i) not in have]
    if rows:
        conn.execute(skips_t.insert(), rows)


def skipped(conn: Connection, job_id: int, limit: int = 20) -> tuple[int, list[tuple[str, str]]]:
    """``(how many, first `limit` as (external_id, reason))`` of the items a job skipped."""
    n = conn.execute(select(func.count()).select_from(skips_t).where(skips_t.c.job_id == job_id)).scalar_one()
    rows = conn.execute(
        select(items_t.c.external_id, skips_t.c.reason)
        .join(items_t, items_t.c.id == skips_t.c.item_id)
        .where(skips_t.c.job_id == job_id)
        .order_by(skips_t.c.item_id)
        .limit(limit)
    )
    return int(n), [(e, r) for e, r in rows]


def sources(conn: Connection) -> list[tuple[int, str, str | None]]:
    """``(item_id, external_id, source_uri)`` of every item, by item id (one pass; for reports)."""
    rows = conn.execution_options(yield_per=50_000).execute(
        select(items_t.c.id, items_t.c.external_id, items_t.c.source_uri).order_by(items_t.c.id)
    )
    return [(int(i), e, u) for i, e, u in rows]


def vectors_of_items(
    conn: Connection, item_ids: Sequence[int], space: str, dim: int
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Stored embeddings in ``space`` of the given items (those that have one): ``(item_ids (m,) int64,
    versions, vectors (m, dim) float32)``, in the order of ``item_ids``."""
    got: dict[int, tuple[str, bytes]] = {}
    ids = [int(i) for i in item_ids]
    for s in range(0, len(ids), _CHUNK):
        rows = conn.execute(
            select(emb_t.c.item_id, emb_t.c.version, emb_t.c.vector).where(
                emb_t.c.space == space, emb_t.c.item_id.in_(ids[s : s + _CHUNK])
            )
        )
        got.update({int(i): (v, bytes(b)) for i, v, b in rows})
    keep = [i for i in ids if i in got]
    vecs = np.frombuffer(b"".join(got[i][1] for i in keep), dtype="<f4").reshape(len(keep), dim)
    return np.asarray(keep, dtype=np.int64), [got[i][0] for i in keep], vecs


def items_by_id(conn: Connection, item_ids: Sequence[int]) -> dict[int, tuple[str, str | None, Any]]:
    """item id -> ``(external_id, source_uri, metadata)`` for the ids that exist."""
    out: dict[int, tuple[str, str | None, Any]] = {}
    ids = [int(i) for i in item_ids]
    for s in range(0, len(ids), _CHUNK):
        rows = conn.execute(
            select(items_t.c.id, items_t.c.external_id, items_t.c.source_uri, items_t.c.metadata).where(
                items_t.c.id.in_(ids[s : s + _CHUNK])
            )
        )
        out.update({int(i): (e, u, m) for i, e, u, m in rows})
    return out


def job_kind(policy: Any) -> str:
    """The kind of a job from its policy JSON (``image`` when it says none: jobs made before kinds)."""
    return str((policy or {}).get("kind") or "image") if isinstance(policy, dict) else "image"


def create_job(conn: Connection, candidate: VersionInfo, policy: Any = None) -> BackfillJobInfo:
    """A ``pending`` job for ``candidate``; ``total``/``done`` start from the current progress."""
    done, total = progress(conn, candidate, job_kind(policy))
    now = utcnow()
    job_id = conn.execute(
        jobs_t.insert()
        .returning(jobs_t.c.id)
        .values(
            candidate=candidate.version,
            space=candidate.space,
            status="pending",
            policy=policy,
            total=total,
            done=done,
            created_at=now,
            updated_at=now,
        )
    ).scalar_one()
    return get_job(conn, int(job_id))


def get_job(conn: Connection, job_id: int) -> BackfillJobInfo:
    r = conn.execute(select(jobs_t).where(jobs_t.c.id == job_id)).first()
    if r is None:
        raise UnknownBackfillJob(job_id)
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
    policy: Any = None,
    release: str | None = None,
) -> BackfillJobInfo:
    """Update a job's status, progress, error and/or policy (None leaves a field as it is). ``release``:
    also give up that owner's lease, in the same transaction (a runner leaving a job it finished: nobody
    sees it done and still owned)."""
    if status is not None and status not in JOB_STATUSES:
        raise InvalidInput(f"backfill status must be one of {JOB_STATUSES}, not {status!r}")
    values: dict[str, Any] = {"updated_at": utcnow()}
    for key, val in (
        ("status", status),
        ("done", done),
        ("total", total),
        ("error", error),
        ("policy", policy),
    ):
        if val is not None:
            values[key] = val
    get_job(conn, job_id)
    conn.execute(update(jobs_t).where(jobs_t.c.id == job_id).values(**values))
    if release is not None:
        release_job(conn, job_id, release)
    return get_job(conn, job_id)


@dataclass(frozen=True)
class JobLease:
    """A backfill write's fence: it commits only while ``owner`` holds job ``job_id``'s lease (renewed for
    ``lease_s`` seconds in the same transaction)."""

    job_id: int
    owner: str
    lease_s: float


def claim_job(conn: Connection, job_id: int, owner: str, lease_s: float) -> bool:
    """Take (or keep) a job's lease for ``lease_s`` seconds: True when ``owner`` holds it now. It succeeds
    only if nobody holds the lease, ``owner`` already does, or the holder's lease ran out (it died, or
    stalled past its lease), and no *other* job is running under a live lease of another replica: one job
    runs at a time, as in a single process (two candidates' jobs at once would keep re-pending each
    other's items). Claims take the writer lock first, so two replicas claiming at once (two jobs, or one)
    run one after the other and the second sees the first's claim."""
    from .store import allocate_vec_ids

    allocate_vec_ids(conn, 0)
    now = utcnow()
    other = jobs_t.alias("other")
    busy = (
        select(other.c.id)
        .where(
            other.c.id != job_id,
            other.c.status == "running",
            other.c.owner.is_not(None),
            other.c.owner != owner,
            other.c.lease_until >= now,
        )
        .exists()
    )
    res = conn.execute(
        update(jobs_t)
        .where(
            jobs_t.c.id == job_id,
            or_(
                jobs_t.c.owner.is_(None),
                jobs_t.c.owner == owner,
                jobs_t.c.lease_until.is_(None),
                jobs_t.c.lease_until < now,
            ),
            ~busy,
        )
        .values(owner=owner, lease_until=now + timedelta(seconds=lease_s))
    )
    return res.rowcount == 1


def renew_lease(conn: Connection, job_id: int, owner: str, lease_s: float) -> bool:
    """Extend ``owner``'s lease of a job by ``lease_s`` seconds from now; False when it no longer holds it
    (another replica took the job over): the caller must stop working on the job."""
    res = conn.execute(
        update(jobs_t)
        .where(jobs_t.c.id == job_id, jobs_t.c.owner == owner)
        .values(lease_until=utcnow() + timedelta(seconds=lease_s))
    )
    return res.rowcount == 1


def release_job(conn: Connection, job_id: int, owner: str) -> bool:
    """Give a job's lease up (no-op, False, when ``owner`` does not hold it)."""
    res = conn.execute(
        update(jobs_t)
        .where(jobs_t.c.id == job_id, jobs_t.c.owner == owner)
        .values(owner=None, lease_until=None)
    )
    return res.rowcount == 1
