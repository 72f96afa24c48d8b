"""Bring a space's FAISS index in line with SQL: snapshot load + replay, or rebuild from scratch.

After :func:`reconcile` the index holds exactly the space's current vec_ids in SQL (index == DB):
- ids in SQL but not in the index (written after the snapshot) are added; their vectors are read only
  for ``vec_id >`` the snapshot's largest id, in the same statement that lists the space;
- ids in the index but not in SQL (superseded by a re-embed, or deleted) are removed, or tombstoned
  where the index type cannot remove;
- with no usable snapshot, the index is built from SQL in chunks (trainable factories are trained first
  on the space's first vectors, or served by the Flat staging index while there are too few).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import Engine

from . import store
from .space_index import Entry, SpaceIndex

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


def reconcile(engine: Engine, sidx: SpaceIndex, index_dir: Path | None) -> ReconcileReport:
    """Make ``sidx`` equal to SQL, starting from its snapshot under ``index_dir`` when usable.

    The caller must exclude mutations of this gallery (it holds the mutation mutex); searches keep
    running on the old index until the new one is swapped in.
    """
    t0 = time.perf_counter()
    loaded = sidx.load_snapshot(index_dir) if index_dir is not None else None
    with engine.connect() as conn:
        n_sql = store.space_count(conn, sidx.space)
        index: faiss.IndexIDMap2 | None = loaded[0] if loaded else None
        index_is_staging = index is not None and sidx.trainable and isinstance(
            faiss.downcast_index(index.index), faiss.IndexFlat
        )
        if sidx.trainable and (index is None or index_is_staging) and n_sql >= sidx.min_train:
            # enough data to train the real index: train it now; the staging snapshot is of no use
            n_train = min(max(sidx.min_train, TRAIN_FACTOR * sidx.min_train), TRAIN_MAX, n_sql)
            index = sidx.build(iter(()), store.training_sample(conn, sidx.space, n_train, sidx.dim))
            loaded = None
        elif index is None:
            index = sidx.empty_index(trained=False)

        snap_ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        snap_sorted = np.sort(snap_ids)
        watermark = int(snap_sorted[-1]) if len(snap_sorted) else 0
        entries: dict[int, Entry] = {}
        replayed = 0
        missing_below: list[int] = []
        for rows, ids, vecs in store.scan_space(conn, sidx.space, watermark, sidx.dim):
            for vid, iid, eid, ver in rows:
                entries[vid] = (iid, eid, ver)
            if len(snap_sorted):
                # rows at or below the watermark that the snapshot lacks (another process wrote them)
                low = np.fromiter((r[0] for r in rows if r[0] <= watermark), dtype=np.int64)
                if len(low):
                    pos = np.searchsorted(snap_sorted, low).clip(max=len(snap_sorted) - 1)
                    missing_below += low[snap_sorted[pos] != low].tolist()
            if len(ids):
                index.add_with_ids(vecs, ids)
                replayed += len(ids)
        if missing_below:
            ids, vecs = store.vectors_by_vec_id(conn, missing_below, sidx.dim)
            index.add_with_ids(vecs, ids)
            replayed += len(ids)

    stale = snap_ids[~np.isin(snap_ids, np.fromiter(entries.keys(), dtype=np.int64, count=len(entries)))]
    tombstones: list[int] = []
    if len(stale):
        if sidx.removable:
            index.remove_ids(faiss.IDSelectorBatch(stale))
        else:
            tombstones = stale.tolist()
    if index.ntotal - len(tombstones) != len(entries):
        # a row listed but whose vector vanished before we read it (a concurrent writer in another
        # process): keep the lookup to what the index really holds
        present = set(faiss.vector_to_array(index.id_map).tolist())
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
