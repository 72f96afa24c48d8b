"""Bring a space's FAISS index in line with SQL: snapshot load + replay, or rebuild from scratch.

After :func:`reconcile` the index holds exactly the space's current vec_ids in SQL (index == DB):

- ids in SQL but not in the snapshot are added. vec_ids are allocated in commit order and a snapshot is
  taken with every commit up to its watermark applied, so these are the rows above the watermark: one
  range query reads them (vectors included).
- ids in the snapshot but no longer in SQL (superseded by a re-embed, or deleted) are dropped: removed,
  or tombstoned where the index type cannot remove. SQL can only have *lost* ids at or below the
  watermark, so when its count of them equals the snapshot's, the two sets are equal and nothing needs
  listing; otherwise the ids are listed (an index-only scan) and compared. Ids at or below the watermark
  that SQL has and the snapshot lacks (only possible if another process wrote to the database) are
  fetched and added too, so the result is exact either way.
- a snapshot is used only whole (its files intact, see :mod:`index.snapshot`) and when a sample of it
  agrees with SQL (:mod:`index.snapshot_check`); otherwise, or with no snapshot at all, the index is built
  from SQL in chunks (a trainable factory is first trained on the space's first vectors, or served by
  the Flat staging index while too few). Listing the whole space (:func:`_from_listing`) then adds it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import Connection, Engine

from . import snapshot_check, store
from .snapshot import EntryArrays, Loaded
from .space_index import Entry, SpaceIndex, can_remove

log = logging.getLogger(__name__)

# How many stored vectors train a trainable index, per vector FAISS asks for (capped).
TRAIN_FACTOR = 4
TRAIN_MAX = 500_000


@dataclass(frozen=True)
class ReconcileReport:
    space: str
    snapshot_used: bool
    replayed: int  # vectors added on top of the snapshot (all of them on a rebuild)
    dropped: int  # ids removed / tombstoned because SQL no longer has them
    total: int  # live vectors after reconciling
    seconds: float


def _not_in(a: np.ndarray, sorted_b: np.ndarray) -> np.ndarray:
    """Elements of ``a`` absent from the sorted array ``sorted_b``."""
    if len(sorted_b) == 0:
        return a
    pos = np.searchsorted(sorted_b, a).clip(max=len(sorted_b) - 1)
    return a[sorted_b[pos] != a]


def _add(index: faiss.IndexIDMap2, entries: dict[int, Entry], chunk: store.ScanChunk) -> int:
    entries.update(chunk.entries())
    if len(chunk.vector_ids):
        index.add_with_ids(chunk.vectors, chunk.vector_ids)
    return len(chunk.vector_ids)


def reconcile(engine: Engine, sidx: SpaceIndex, index_dir: Path | None) -> ReconcileReport:
    """Make ``sidx`` equal to SQL, starting from its snapshot under ``index_dir`` when usable.

    The caller must exclude mutations of this gallery (it holds the mutation mutex); searches keep
    running on the old index until the new one is swapped in.
    """
    t0 = time.perf_counter()
    loaded = sidx.load_snapshot(index_dir) if index_dir is not None else None
    with engine.connect() as conn:
        if loaded is not None:
            loaded = _checked(conn, sidx, loaded)
        index = loaded.index if loaded else None
        # (with background builds the staging index serves instead, and the owner builds off to the side)
        if (
            sidx.trainable
            and not sidx.background
            and (index is None or isinstance(faiss.downcast_index(index.index), faiss.IndexFlat))
        ):
            n_sql = store.space_count(conn, sidx.space)
            if n_sql >= sidx.min_train:
                # enough data to train the real index now; a staging snapshot is of no use then
                n_train = min(TRAIN_FACTOR * sidx.min_train, TRAIN_MAX, n_sql)
                index = sidx.build(iter(()), store.training_sample(conn, sidx.space, n_train, sidx.dim))
                loaded = None
        if index is None:
            index = sidx.empty_index(trained=False)
        snap_ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        watermark = int(snap_ids.max()) if len(snap_ids) else 0
        if loaded is not None:
            entries, replayed = _from_lookup(conn, sidx, index, loaded.entries, watermark)
        else:
            entries, replayed = _from_listing(conn, sidx, index, np.sort(snap_ids), watermark)

    live = np.fromiter(entries.keys(), dtype=np.int64, count=len(entries))
    live.sort()
    stale = _not_in(snap_ids, live)
    tombstones: list[int] = []
    if len(stale):
        if can_remove(index):
            index.remove_ids(faiss.IDSelectorBatch(stale))
        else:
            tombstones = stale.tolist()
    if index.ntotal - len(tombstones) != len(entries):
        # a row listed but whose vector vanished before we read it (a concurrent writer in another
        # process): keep the lookup to what the index really holds
        present = set(faiss.vector_to_array(index.id_map).tolist()) - set(tombstones)
        entries = {k: v for k, v in entries.items() if k in present}
    sidx.swap(index, entries, tombstones)
    sidx.changes_since_snapshot = replayed + len(stale) if loaded else max(replayed, 1)
    report = ReconcileReport(
        space=sidx.space,
        snapshot_used=loaded is not None,
        replayed=replayed,
        dropped=len(stale),
        total=len(entries),
        seconds=time.perf_counter() - t0,
    )
    log.info("space %r reconciled: %s", sidx.space, report)
    return report


def _checked(conn: Connection, sidx: SpaceIndex, loaded: Loaded) -> Loaded | None:
    """``loaded`` if a sample of it agrees with SQL (:mod:`index.snapshot_check`), else None (logged)."""
    try:
        reason = snapshot_check.mismatch(conn, loaded, sidx.dim)
    except Exception as e:  # a snapshot that breaks the check is no snapshot to trust
        reason = f"{type(e).__name__}: {e}"
    if reason is None:
        return loaded
    log.warning("space %r: snapshot disagrees with SQL (%s); rebuilding from SQL", sidx.space, reason)
    return None


def _from_lookup(
    conn: Connection, sidx: SpaceIndex, index: faiss.IndexIDMap2, lookup: EntryArrays, watermark: int
) -> tuple[dict[int, Entry], int]:
    """Snapshot with its id lookup: count-check the ids at or below the watermark, replay those above."""
    entries = lookup.to_dict()
    replayed = 0
    if store.count_upto(conn, sidx.space, watermark) != len(entries):
        sql_low = store.vec_ids_upto(conn, sidx.space, watermark)
        for vid in _not_in(lookup.vec_ids, sql_low).tolist():
            del entries[vid]  # superseded or deleted since the snapshot
        missing = _not_in(sql_low, lookup.vec_ids)
        for chunk in store.rows_by_vec_ids(conn, missing.tolist(), sidx.dim):
            replayed += _add(index, entries, chunk)
    for chunk in store.scan_space(conn, sidx.space, sidx.dim, above=watermark):
        replayed += _add(index, entries, chunk)
    return entries, replayed


def _from_listing(
    conn: Connection, sidx: SpaceIndex, index: faiss.IndexIDMap2, snap_sorted: np.ndarray, watermark: int
) -> tuple[dict[int, Entry], int]:
    """No lookup: list the whole space (vectors only above the watermark) and add what the index lacks."""
    entries: dict[int, Entry] = {}
    replayed = 0
    missing_below: list[int] = []
    for chunk in store.scan_space(conn, sidx.space, sidx.dim, vectors_above=watermark):
        replayed += _add(index, entries, chunk)
        if len(snap_sorted):
            ids = np.asarray(chunk.vec_ids, dtype=np.int64)
            missing_below += _not_in(ids[ids <= watermark], snap_sorted).tolist()
    for chunk in store.rows_by_vec_ids(conn, missing_below, sidx.dim):
        replayed += _add(index, entries, chunk)
    return entries, replayed
