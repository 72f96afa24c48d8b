"""SQL side of items and embeddings: portable Core statements over a caller-owned transaction.

Vectors are stored as float32 little-endian bytes of unit norm, shape (d,). Every write of a vector takes
a fresh ``vec_id`` from the ``counters`` row (:func:`allocate_vec_ids`), which is incremented with an
UPDATE *first* in each writing transaction: that UPDATE takes the row lock (PostgreSQL) or the database
write lock (SQLite), so concurrent writers are serialised and vec_id order equals commit order.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
from sqlalchemy import Connection, bindparam, case, delete, func, select, update

from .errors import DuplicateIds, ItemNotFound
from .tables import VEC_ID_COUNTER, Counter, Embedding, Item, utcnow

# Portable bound on IN-list sizes (old SQLite builds allow 999 parameters per statement).
IN_CHUNK = 500

items_t = Item.__table__
emb_t = Embedding.__table__
counters_t = Counter.__table__

WriteMode = Literal["add", "upsert", "reembed"]


def _chunks(seq: Sequence[Any], n: int = IN_CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def allocate_vec_ids(conn: Connection, n: int) -> int:
    """Reserve ``n`` consecutive vec_ids (n may be 0: then it only takes the writer lock); returns the first."""
    conn.execute(
        update(counters_t).where(counters_t.c.name == VEC_ID_COUNTER).values(value=counters_t.c.value + n)
    )
    last = conn.execute(select(counters_t.c.value).where(counters_t.c.name == VEC_ID_COUNTER)).scalar_one()
    return int(last) - n + 1


def find_items(conn: Connection, external_ids: Sequence[str]) -> dict[str, int]:
    """external_id -> item id, for those that exist."""
    out: dict[str, int] = {}
    for chunk in _chunks(external_ids):
        rows = conn.execute(select(items_t.c.external_id, items_t.c.id).where(items_t.c.external_id.in_(chunk)))
        out.update({e: int(i) for e, i in rows})
    return out


def embeddings_in_space(conn: Connection, item_ids: Sequence[int], space: str) -> dict[int, int]:
    """item id -> current vec_id in ``space``, for items that have an embedding there."""
    out: dict[int, int] = {}
    for chunk in _chunks(item_ids):
        rows = conn.execute(
            select(emb_t.c.item_id, emb_t.c.vec_id).where(emb_t.c.space == space, emb_t.c.item_id.in_(chunk))
        )
        out.update({int(i): int(v) for i, v in rows})
    return out


@dataclass
class WriteResult:
    """What a committed write did, for the FAISS side: remove ``old_vec_ids``, add ``vec_ids``."""

    item_ids: list[int]  # per input row
    vec_ids: np.ndarray  # (n,) int64, per input row
    old_vec_ids: list[int] = field(default_factory=list)
    inserted: int = 0


def write_embeddings(
    conn: Connection,
    mode: WriteMode,
    *,
    external_ids: Sequence[str],
    vectors: np.ndarray,
    version: str,
    space: str,
    metadata: Sequence[Any] | None = None,
    source_uris: Sequence[str | None] | None = None,
) -> WriteResult:
    """Store ``vectors`` (n, d) float32 unit rows for ``external_ids`` in ``space``, made by ``version``.

    - ``add``: every external id must be new (else :class:`DuplicateIds`); items are created.
    - ``upsert``: new ids are created; existing items get their vector in ``space`` replaced and their
      metadata / source_uri replaced where the given value is not None.
    - ``reembed``: every item must exist (else :class:`ItemNotFound`); only its vector in ``space`` is
      written (replaced, or created when the item had none in that space: backfill into a new space).

    Raises before any row is written, but the caller must roll back anyway (the counter moved).
    """
    n = len(external_ids)
    now = utcnow()
    first = allocate_vec_ids(conn, n)  # first statement: takes the writer lock
    vec_ids = np.arange(first, first + n, dtype=np.int64)
    existing = find_items(conn, external_ids)
    if mode == "add" and existing:
        raise DuplicateIds(existing, "already in the gallery")
    if mode == "reembed":
        missing = [e for e in external_ids if e not in existing]
        if missing:
            raise ItemNotFound(missing)

    metadata = metadata if metadata is not None else [None] * n
    source_uris = source_uris if source_uris is not None else [None] * n
    new_rows = [
        {"external_id": e, "metadata": m, "source_uri": u, "created_at": now, "updated_at": now}
        for e, m, u in zip(external_ids, metadata, source_uris, strict=True)
        if e not in existing
    ]
    item_ids = dict(existing)
    if new_rows:
        ins = items_t.insert().returning(items_t.c.id, items_t.c.external_id)
        for chunk in _chunks(new_rows, 1000):
            item_ids.update({e: int(i) for i, e in conn.execute(ins, list(chunk))})

    if mode == "upsert":
        meta_updates = [
            {"b_id": existing[e], "b_meta": m, "b_now": now}
            for e, m in zip(external_ids, metadata, strict=True)
            if e in existing and m is not None
        ]
        if meta_updates:
            conn.execute(
                update(items_t)
                .where(items_t.c.id == bindparam("b_id"))
                .values(metadata=bindparam("b_meta", type_=items_t.c.metadata.type), updated_at=bindparam("b_now")),
                meta_updates,
            )
        uri_updates = [
            {"b_id": existing[e], "b_uri": u, "b_now": now}
            for e, u in zip(external_ids, source_uris, strict=True)
            if e in existing and u is not None
        ]
        if uri_updates:
            conn.execute(
                update(items_t)
                .where(items_t.c.id == bindparam("b_id"))
                .values(source_uri=bindparam("b_uri"), updated_at=bindparam("b_now")),
                uri_updates,
            )

    old = embeddings_in_space(conn, list(existing.values()), space) if existing else {}
    vec_bytes = [row.tobytes() for row in np.ascontiguousarray(vectors, dtype="<f4")]
    ids_per_row = [item_ids[e] for e in external_ids]
    inserts, replaces = [], []
    for iid, vb, vid in zip(ids_per_row, vec_bytes, vec_ids.tolist(), strict=True):
        if iid in old:
            replaces.append({"b_item": iid, "b_vector": vb, "b_vec_id": vid, "b_version": version, "b_now": now})
        else:
            inserts.append(
                {"item_id": iid, "space": space, "version": version, "vector": vb, "vec_id": vid, "updated_at": now}
            )
    if inserts:
        for chunk in _chunks(inserts, 1000):
            conn.execute(emb_t.insert(), list(chunk))
    if replaces:
        conn.execute(
            update(emb_t)
            .where(emb_t.c.item_id == bindparam("b_item"), emb_t.c.space == space)
            .values(
                vector=bindparam("b_vector"),
                vec_id=bindparam("b_vec_id"),
                version=bindparam("b_version"),
                updated_at=bindparam("b_now"),
            ),
            replaces,
        )
    return WriteResult(
        item_ids=ids_per_row, vec_ids=vec_ids, old_vec_ids=list(old.values()), inserted=len(new_rows)
    )


def delete_items(
    conn: Connection, external_ids: Sequence[str], missing_ok: bool
) -> tuple[int, list[tuple[str, int]]]:
    """Delete items and all their embeddings; returns ``(items deleted, [(space, vec_id) removed]``.

    Unknown ids raise :class:`ItemNotFound` (nothing deleted) unless ``missing_ok``.
    """
    allocate_vec_ids(conn, 0)  # serialise with other writers
    found = find_items(conn, external_ids)
    missing = [e for e in external_ids if e not in found]
    if missing and not missing_ok:
        raise ItemNotFound(missing)
    ids = list(found.values())
    removed: list[tuple[str, int]] = []
    for chunk in _chunks(ids):
        removed += [(s, int(v)) for s, v in conn.execute(
            select(emb_t.c.space, emb_t.c.vec_id).where(emb_t.c.item_id.in_(chunk))
        )]
        conn.execute(delete(emb_t).where(emb_t.c.item_id.in_(chunk)))
        conn.execute(delete(items_t).where(items_t.c.id.in_(chunk)))
    return len(ids), removed


_interned: dict[str, str] = {}


def _intern(s: str) -> str:
    return _interned.setdefault(s, sys.intern(s))


def scan_space(
    conn: Connection, space: str, vectors_above: int, dim: int, chunk: int = 50_000
) -> Iterator[tuple[list[tuple[int, int, str, str]], np.ndarray, np.ndarray]]:
    """Stream a space in vec_id order, in one statement (one consistent snapshot).

    Yields ``(entries, vec_ids, vectors)`` per chunk: ``entries`` are ``(vec_id, item_id, external_id,
    version)`` for every row; ``vec_ids`` (m,) int64 and ``vectors`` (m, dim) float32 only for rows with
    ``vec_id > vectors_above`` (the vectors a snapshot misses), so a reopen reads only what it needs.
    """
    vec = case((emb_t.c.vec_id > vectors_above, emb_t.c.vector), else_=None)
    stmt = (
        select(emb_t.c.vec_id, emb_t.c.item_id, items_t.c.external_id, emb_t.c.version, vec)
        .join(items_t, items_t.c.id == emb_t.c.item_id)
        .where(emb_t.c.space == space)
        .order_by(emb_t.c.vec_id)
    )
    result = conn.execution_options(yield_per=chunk).execute(stmt)
    for part in result.partitions():
        entries = [(int(r[0]), int(r[1]), r[2], _intern(r[3])) for r in part]
        with_vec = [(r[0], r[4]) for r in part if r[4] is not None]
        if with_vec:
            ids = np.fromiter((int(v) for v, _ in with_vec), dtype=np.int64, count=len(with_vec))
            blob = b"".join(bytes(b) for _, b in with_vec)
            vecs = np.frombuffer(blob, dtype="<f4").reshape(len(with_vec), dim)
        else:
            ids, vecs = np.empty(0, np.int64), np.empty((0, dim), np.float32)
        yield entries, ids, vecs


def vectors_by_vec_id(conn: Connection, vec_ids: Sequence[int], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The stored vectors of given vec_ids (those still present): ``(vec_ids (m,), vectors (m, dim))``."""
    got: list[tuple[int, bytes]] = []
    for chunk in _chunks(list(vec_ids)):
        got += [(int(v), bytes(b)) for v, b in conn.execute(
            select(emb_t.c.vec_id, emb_t.c.vector).where(emb_t.c.vec_id.in_(chunk))
        )]
    ids = np.array([v for v, _ in got], dtype=np.int64)
    vecs = np.frombuffer(b"".join(b for _, b in got), dtype="<f4").reshape(len(got), dim)
    return ids, vecs


def training_sample(conn: Connection, space: str, n: int, dim: int) -> np.ndarray:
    """The first ``n`` stored vectors of ``space`` by vec_id, (m <= n, dim) float32, to train an index."""
    rows = conn.execute(
        select(emb_t.c.vector).where(emb_t.c.space == space).order_by(emb_t.c.vec_id).limit(n)
    ).scalars().all()
    return np.frombuffer(b"".join(bytes(b) for b in rows), dtype="<f4").reshape(len(rows), dim)


def space_count(conn: Connection, space: str) -> int:
    return int(conn.execute(select(func.count()).select_from(emb_t).where(emb_t.c.space == space)).scalar_one())


def item_count(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(items_t)).scalar_one())


def counts_by(conn: Connection, column: str) -> dict[str, int]:
    col = emb_t.c[column]
    return {k: int(n) for k, n in conn.execute(select(col, func.count()).group_by(col))}


@dataclass(frozen=True)
class ItemRecord:
    """An item as stored: ``embedded_by`` maps each space the item has an embedding in to its version."""

    external_id: str
    item_id: int
    metadata: Any
    source_uri: str | None
    created_at: datetime
    updated_at: datetime
    embedded_by: dict[str, str]


def get_items(conn: Connection, external_ids: Sequence[str]) -> dict[str, ItemRecord]:
    """Records of the given external ids that exist (unknown ids are absent from the result)."""
    out: dict[str, ItemRecord] = {}
    for chunk in _chunks(list(external_ids)):
        rows = conn.execute(select(items_t).where(items_t.c.external_id.in_(chunk))).all()
        by_id = {int(r.id): r for r in rows}
        emb: dict[int, dict[str, str]] = {i: {} for i in by_id}
        if by_id:
            for iid, space, version in conn.execute(
                select(emb_t.c.item_id, emb_t.c.space, emb_t.c.version).where(emb_t.c.item_id.in_(list(by_id)))
            ):
                emb[int(iid)][space] = version
        for iid, r in by_id.items():
            out[r.external_id] = ItemRecord(
                external_id=r.external_id,
                item_id=iid,
                metadata=r._mapping["metadata"],
                source_uri=r.source_uri,
                created_at=r.created_at,
                updated_at=r.updated_at,
                embedded_by=emb[iid],
            )
    return out


def get_vector(conn: Connection, external_id: str, space: str, dim: int) -> tuple[np.ndarray, str] | None:
    """The stored unit vector (dim,) float32 of an item in ``space`` and its version, or None."""
    row = conn.execute(
        select(emb_t.c.vector, emb_t.c.version)
        .join(items_t, items_t.c.id == emb_t.c.item_id)
        .where(items_t.c.external_id == external_id, emb_t.c.space == space)
    ).first()
    if row is None:
        return None
    return np.frombuffer(bytes(row[0]), dtype="<f4").reshape(dim).copy(), row[1]
