"""SQL of item browsing and editing beyond :mod:`index.store`: scrolling by external id, reporting deletes,
metadata updates. Portable Core statements over a caller-owned transaction, like :mod:`index.store`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, func, select, update

from . import store
from .errors import InvalidInput, ItemNotFound
from .store import ItemRecord, items_t
from .validation import check_metadata

MAX_SCROLL = 1000
"""Most items one :func:`scroll` page returns."""


def scroll(conn: Connection, after: str | None, limit: int) -> list[ItemRecord]:
    """Up to ``limit`` items whose external id sorts after ``after`` (from the first with None), in the
    database's order of external ids (the unique index on them: each page is one index range scan)."""
    stmt = select(items_t.c.external_id).order_by(items_t.c.external_id).limit(limit)
    if after is not None:
        stmt = stmt.where(items_t.c.external_id > after)
    ids = list(conn.execute(stmt).scalars())
    found = store.get_items(conn, ids)
    return [found[e] for e in ids if e in found]


def delete_found(
    conn: Connection, external_ids: Sequence[str]
) -> tuple[list[str], list[str], list[tuple[str, int]]]:
    """Delete the items of ``external_ids`` that exist: ``(deleted ids, missing ids, [(space, vec_id)
    removed])``, both lists in input order. Takes the writer lock first, so what it reports is exact."""
    store.allocate_vec_ids(conn, 0)  # serialise with other writers before looking
    found = store.find_items(conn, external_ids)
    deleted = [e for e in external_ids if e in found]
    missing = [e for e in external_ids if e not in found]
    _, removed = store.delete_items(conn, deleted, missing_ok=True)
    return deleted, missing, removed


def merged_metadata(current: Any, changes: Mapping[str, Any], external_id: str) -> dict[str, Any]:
    """``current`` (a dict or None) with ``changes`` applied: a key whose value is None is removed, the
    others are set."""
    if current is None:
        current = {}
    if not isinstance(current, dict):
        raise InvalidInput(
            f"metadata of {external_id!r} is a {type(current).__name__}, not an object: replace it (merge=false)"
        )
    out = dict(current)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def update_metadata(
    conn: Connection, external_id: str, metadata: Mapping[str, Any] | None, merge: bool
) -> ItemRecord:
    """Replace (``merge=False``) or merge into (``merge=True``, see :func:`merged_metadata`) the metadata of
    one item; validated like an ingest's (:func:`~index.validation.check_metadata`). Returns the record as
    stored. :class:`ItemNotFound` for an unknown id. Takes the writer lock first (read-modify-write)."""
    store.allocate_vec_ids(conn, 0)
    row = conn.execute(
        select(items_t.c.id, items_t.c.metadata).where(items_t.c.external_id == external_id)
    ).first()
    if row is None:
        raise ItemNotFound([external_id])
    if merge:
        new: Any = merged_metadata(row[1], metadata or {}, external_id)
    else:
        new = dict(metadata) if metadata is not None else None
    check_metadata(new, external_id)
    conn.execute(
        update(items_t)
        .where(items_t.c.id == row[0])
        .values({items_t.c.metadata: new, items_t.c.updated_at: func.now()})
    )
    return store.get_items(conn, [external_id])[external_id]
