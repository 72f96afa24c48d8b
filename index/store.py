"""SQL side of items and embeddings: portable Core statements over a caller-owned transaction.

Vectors are stored as float32 little-endian bytes of unit norm, shape (d,). Every write of a vector takes
a fresh ``vec_id`` from the ``counters`` row (:func:`allocate_vec_ids`), which is incremented with an
UPDATE *first* in each writing transaction: that UPDATE takes the row lock (PostgreSQL) or the database
write lock (SQLite), so concurrent writers are serialised and vec_id order equals commit order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, cast

import numpy as np
from sqlalchemy import Connection, Table, bindparam, case, delete, func, select, update

from .errors import DuplicateIds, ItemNotFound
from .tables import VEC_ID_COUNTER, Counter, Embedding, Item
from .types import ROUTE_MODEL, ROUTE_SEP

# Portable bound on IN-list sizes (old SQLite builds allow 999 parameters per statement).
IN_CHUNK = 500

items_t = cast(Table, Item.__table__)
emb_t = cast(Table, Embedding.__table__)
counters_t = cast(Table, Counter.__table__)

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


def head(conn: Connection) -> int:
    """The last vec_id handed out (committed: the counter row is locked until its writer commits). Every
    committed write of a vector, and every delete (:func:`mark_change`), moves it, so another process can
    tell from this one value whether the database changed since it last looked."""
    return int(
        conn.execute(select(counters_t.c.value).where(counters_t.c.name == VEC_ID_COUNTER)).scalar_one()
    )


def mark_change(conn: Connection) -> int:
    """Burn one vec_id so that :func:`head` moves for a write that stores no vector (a delete); returns it."""
    return allocate_vec_ids(conn, 1)


def find_items(conn: Connection, external_ids: Sequence[str]) -> dict[str, int]:
    """external_id -> item id, for those that exist."""
    out: dict[str, int] = {}
    for chunk in _chunks(external_ids):
        rows = conn.execute(
            select(items_t.c.external_id, items_t.c.id).where(items_t.c.external_id.in_(chunk))
        )
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
    route: str = ROUTE_MODEL,
) -> WriteResult:
    """Store ``vectors`` (n, d) float32 unit rows for ``external_ids`` in ``space``, made by ``version``
    through ``route`` (``model``: it embedded the sources; ``transform``: mapped from another space).

    - ``add``: every external id must be new (else :class:`DuplicateIds`); items are created.
    - ``upsert``: new ids are created; existing items get their vector in ``space`` replaced and their
      metadata / source_uri replaced where the given value is not None.
    - ``reembed``: every item must exist (else :class:`ItemNotFound`); only its vector in ``space`` is
      written (replaced, or created when the item had none in that space: backfill into a new space).

    Raises before any row is written, but the caller must roll back anyway (the counter moved).
    """
    n = len(external_ids)
    now = func.now()  # an SQL expression: no per-row parameter
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
        {"external_id": e, "metadata": m, "source_uri": u}
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
            {"b_id": existing[e], "b_meta": m}
            for e, m in zip(external_ids, metadata, strict=True)
            if e in existing and m is not None
        ]
        if meta_updates:
            conn.execute(
                update(items_t)
                .where(items_t.c.id == bindparam("b_id"))
                .values(metadata=bindparam("b_meta", type_=items_t.c.metadata.type), updated_at=now),
                meta_updates,
            )
        uri_updates = [
            {"b_id": existing[e], "b_uri": u}
            for e, u in zip(external_ids, source_uris, strict=True)
            if e in existing and u is not None
        ]
        if uri_updates:
            conn.execute(
                update(items_t)
                .where(items_t.c.id == bindparam("b_id"))
                .values(source_uri=bindparam("b_uri"), updated_at=now),
                uri_updates,
            )

    old = embeddings_in_space(conn, list(existing.values()), space) if existing else {}
    vec_bytes = [row.tobytes() for row in np.ascontiguousarray(vectors, dtype="<f4")]
    ids_per_row = [item_ids[e] for e in external_ids]
    inserts, replaces = [], []
    for iid, vb, vid in zip(ids_per_row, vec_bytes, vec_ids.tolist(), strict=True):
        if iid in old:
            replaces.append({"b_item": iid, "b_vector": vb, "b_vec_id": vid, "b_version": version})
        else:
            inserts.append(
                {
                    "item_id": iid,
                    "space": space,
                    "version": version,
                    "vector": vb,
                    "vec_id": vid,
                    "route": route,
                }
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
                route=route,
                updated_at=now,
            ),
            replaces,
        )
    return WriteResult(
        item_ids=ids_per_row, vec_ids=vec_ids, old_vec_ids=list(old.values()), inserted=len(new_rows)
    )


def write_item_vectors(
    conn: Connection,
    *,
    item_ids: np.ndarray,
    vectors: np.ndarray,
    version: str,
    space: str,
    route: str,
) -> tuple[WriteResult, np.ndarray]:
    """Store ``vectors`` (n, d) float32 unit rows in ``space`` for existing items given by id (``item_ids``
    (n,) int64, ascending, distinct), made by ``version`` through ``route``: the write of a job that listed
    the items itself (a transform job). Items deleted since they were listed are left out. Returns the
    write and a (n,) bool mask of the rows written.

    Lookups go by id ranges, not IN-lists of external ids: a batch of listed items is one range of ids,
    and a transform job's work per item is small enough that the statements' overhead is what it costs.
    """
    n = len(item_ids)
    first = allocate_vec_ids(conn, n)  # first statement: takes the writer lock
    lo, hi = int(item_ids[0]), int(item_ids[-1])
    alive = {int(i) for (i,) in conn.execute(select(items_t.c.id).where(items_t.c.id.between(lo, hi)))}
    keep = np.fromiter((int(i) in alive for i in item_ids), dtype=bool, count=n)
    ids = item_ids[keep]
    vec_ids = np.arange(first, first + len(ids), dtype=np.int64)
    old = dict(
        conn.execute(
            select(emb_t.c.item_id, emb_t.c.vec_id).where(
                emb_t.c.space == space, emb_t.c.item_id.between(lo, hi)
            )
        ).all()
    )
    blobs = [row.tobytes() for row in np.ascontiguousarray(vectors[keep], dtype="<f4")]
    inserts, replaces, old_vec_ids = [], [], []
    for iid, vb, vid in zip(ids.tolist(), blobs, vec_ids.tolist(), strict=True):
        if iid in old:
            old_vec_ids.append(int(old[iid]))
            replaces.append({"b_item": iid, "b_vector": vb, "b_vec_id": vid})
        else:
            inserts.append(
                {
                    "item_id": iid,
                    "space": space,
                    "version": version,
                    "vector": vb,
                    "vec_id": vid,
                    "route": route,
                }
            )
    if inserts:
        conn.execute(emb_t.insert(), inserts)
    if replaces:
        conn.execute(
            update(emb_t)
            .where(emb_t.c.item_id == bindparam("b_item"), emb_t.c.space == space)
            .values(
                vector=bindparam("b_vector"),
                vec_id=bindparam("b_vec_id"),
                version=version,
                route=route,
                updated_at=func.now(),
            ),
            replaces,
        )
    res = WriteResult(item_ids=ids.tolist(), vec_ids=vec_ids, old_vec_ids=old_vec_ids, inserted=0)
    return res, keep


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
        removed += [
            (s, int(v))
            for s, v in conn.execute(select(emb_t.c.space, emb_t.c.vec_id).where(emb_t.c.item_id.in_(chunk)))
        ]
        conn.execute(delete(emb_t).where(emb_t.c.item_id.in_(chunk)))
        conn.execute(delete(items_t).where(items_t.c.id.in_(chunk)))
    return len(ids), removed


@dataclass
class ScanChunk:
    """Rows of a space: ``vec_ids``/``item_ids``/``external_ids``/``versions`` for every row; ``vector_ids``
    (m,) int64 and ``vectors`` (m, d) float32 for the rows whose vector was read."""

    vec_ids: list[int]
    item_ids: list[int]
    external_ids: list[str]
    versions: list[str]
    vector_ids: np.ndarray
    vectors: np.ndarray

    def entries(self) -> dict[int, tuple[int, str, str]]:
        return dict(
            zip(self.vec_ids, zip(self.item_ids, self.external_ids, self.versions, strict=True), strict=True)
        )


def _chunk(rows: Sequence[Any], dim: int, versions: dict[str, str]) -> ScanChunk:
    vids, iids, eids, vers, blobs = (list(c) for c in zip(*rows, strict=True))
    vers = list(map(versions.setdefault, vers, vers))  # one str object per version, not per row
    if all(b is not None for b in blobs):
        vector_ids = np.asarray(vids, dtype=np.int64)
        with_vec = blobs
    else:
        keep = [i for i, b in enumerate(blobs) if b is not None]
        vector_ids = np.asarray([vids[i] for i in keep], dtype=np.int64)
        with_vec = [blobs[i] for i in keep]
    vecs = np.frombuffer(b"".join(bytes(b) for b in with_vec), dtype="<f4").reshape(len(with_vec), dim)
    return ScanChunk(vids, iids, eids, vers, vector_ids, vecs)


def scan_space(
    conn: Connection, space: str, dim: int, *, above: int = 0, vectors_above: int = 0, chunk: int = 50_000
) -> Iterator[ScanChunk]:
    """Stream the rows of ``space`` with ``vec_id > above``, in vec_id order, in one statement.

    Vectors are read only for ``vec_id > vectors_above`` (the ones a snapshot misses), so a reopen that
    must list ids but has most vectors already does not read them.
    """
    vec = emb_t.c.vector if vectors_above <= above else case((emb_t.c.vec_id > vectors_above, emb_t.c.vector))
    stmt = (
        select(emb_t.c.vec_id, emb_t.c.item_id, items_t.c.external_id, tag_column(), vec)
        .join(items_t, items_t.c.id == emb_t.c.item_id)
        .where(emb_t.c.space == space, emb_t.c.vec_id > above)
        .order_by(emb_t.c.vec_id)
    )
    versions: dict[str, str] = {}
    for part in conn.execution_options(yield_per=chunk).execute(stmt).partitions():
        if part:
            yield _chunk(part, dim, versions)


def rows_by_vec_ids(conn: Connection, vec_ids: Sequence[int], dim: int) -> Iterator[ScanChunk]:
    """Like :func:`scan_space` for given vec_ids (those still present), vectors included."""
    versions: dict[str, str] = {}
    for ids in _chunks(list(vec_ids)):
        rows = conn.execute(
            select(emb_t.c.vec_id, emb_t.c.item_id, items_t.c.external_id, tag_column(), emb_t.c.vector)
            .join(items_t, items_t.c.id == emb_t.c.item_id)
            .where(emb_t.c.vec_id.in_(ids))
        ).all()
        if rows:
            yield _chunk(rows, dim, versions)


def tag_column() -> Any:
    """SQL of a row's in-memory tag (:func:`index.types.route_label`): its version, + "+route" unless
    the route is "model"."""
    return case(
        (emb_t.c.route == ROUTE_MODEL, emb_t.c.version),
        else_=emb_t.c.version + ROUTE_SEP + emb_t.c.route,
    )


def count_upto(conn: Connection, space: str, watermark: int) -> int:
    """Embedding rows of ``space`` with ``vec_id <= watermark`` (an index-only count)."""
    stmt = select(func.count()).select_from(emb_t).where(emb_t.c.space == space, emb_t.c.vec_id <= watermark)
    return int(conn.execute(stmt).scalar_one())


def vec_ids_upto(conn: Connection, space: str, watermark: int) -> np.ndarray:
    """Sorted vec_ids of ``space`` up to ``watermark``, (n,) int64."""
    stmt = (
        select(emb_t.c.vec_id)
        .where(emb_t.c.space == space, emb_t.c.vec_id <= watermark)
        .order_by(emb_t.c.vec_id)
    )
    result = conn.execution_options(yield_per=200_000).execute(stmt).scalars()
    parts = [np.asarray(p, dtype=np.int64) for p in result.partitions()]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def training_sample(conn: Connection, space: str, n: int, dim: int) -> np.ndarray:
    """The first ``n`` stored vectors of ``space`` by vec_id, (m <= n, dim) float32, to train an index."""
    rows = (
        conn.execute(select(emb_t.c.vector).where(emb_t.c.space == space).order_by(emb_t.c.vec_id).limit(n))
        .scalars()
        .all()
    )
    return np.frombuffer(b"".join(bytes(b) for b in rows), dtype="<f4").reshape(len(rows), dim)


def space_count(conn: Connection, space: str) -> int:
    return int(
        conn.execute(select(func.count()).select_from(emb_t).where(emb_t.c.space == space)).scalar_one()
    )


def item_count(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(items_t)).scalar_one())


def counts_by_version_route(conn: Connection, space: str) -> dict[str, dict[str, int]]:
    """Embeddings of ``space`` per version and route: ``{version: {route: n}}``."""
    out: dict[str, dict[str, int]] = {}
    stmt = (
        select(emb_t.c.version, emb_t.c.route, func.count())
        .where(emb_t.c.space == space)
        .group_by(emb_t.c.version, emb_t.c.route)
    )
    for v, r, n in conn.execute(stmt):
        out.setdefault(v, {})[r] = int(n)
    return out


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
                select(emb_t.c.item_id, emb_t.c.space, emb_t.c.version).where(
                    emb_t.c.item_id.in_(list(by_id))
                )
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
