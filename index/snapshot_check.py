"""Does a loaded snapshot agree with SQL? A sampled comparison, run on every snapshot load.

Checksums (:mod:`index.snapshot`) prove the files are the bytes the writer wrote; they cannot prove the
writer wrote the right thing (a bug, an index of the same ids but other vectors, a lookup with ids
permuted, a snapshot copied from another gallery). So at load, a seeded sample of the snapshot's live
vec_ids is read back from SQL and compared with the snapshot:

- the lookup: each sampled vec_id must map to SQL's ``(item_id, external_id, version)``, exactly;
- the index: the vector FAISS holds for each sampled vec_id must be the stored one. Where the index can
  reconstruct (flat codes, HNSW: ``IndexIDMap2.reconstruct``; IVF without a direct map: from its inverted
  list, :func:`_ivf_reconstruct`), the distance of the decoded vector to the stored one must be within the
  codec's own error for that vector (``sa_decode(sa_encode(x))``, 0 for exact storage) — so lossy codes
  (PQ, SQ) pass and another item's vector (distance ~1.4 for unit vectors) does not. An index that can do
  neither is asked to *search* each stored vector, which must find its own vec_id among the first few.

Bounded cost: ``sample`` (64) rows by primary key from SQL, ``sample`` reconstructions; for IVF the id
lists of the vectors' own inverted lists (all lists only for a vector found elsewhere).
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
from sqlalchemy import Connection

from . import store
from .snapshot import Loaded

log = logging.getLogger(__name__)

SAMPLE = 64  # vec_ids compared with SQL per snapshot load
SEARCH_K = 10  # where the index cannot reconstruct: a stored vector must find its own id in this top-k
ABS_TOL = 1e-3  # L2 distance allowed on top of twice the codec's own error (float rounding, tied codes)


def mismatch(conn: Connection, loaded: Loaded, dim: int, sample: int = SAMPLE) -> str | None:
    """Why the snapshot disagrees with SQL on a seeded sample of its live vec_ids (a message), or None.

    The seed is the snapshot's watermark: the same snapshot is always checked on the same ids (a failure
    reproduces), each new snapshot on others. Ids SQL no longer has (deleted or superseded since the
    snapshot) are skipped: reconciling drops them anyway.
    """
    live = loaded.entries.vec_ids
    if len(live) == 0 or sample <= 0:
        return None
    rng = np.random.default_rng(max(int(loaded.info.watermark), 0))
    picked = np.sort(rng.choice(live, size=min(sample, len(live)), replace=False))
    rows = list(store.rows_by_vec_ids(conn, picked.tolist(), dim))
    if not rows:
        return None
    vec_ids = np.concatenate([np.asarray(c.vec_ids, dtype=np.int64) for c in rows])
    sql_entries = {vid: e for c in rows for vid, e in c.entries().items()}
    lookup = loaded.entries
    at = np.searchsorted(lookup.vec_ids, vec_ids)
    for vid, i in zip(vec_ids.tolist(), at.tolist(), strict=True):
        mine = (int(lookup.item_ids[i]), lookup.external_ids[i], lookup.versions[i])
        if mine != sql_entries[vid]:
            return f"lookup maps vec_id {vid} to {mine}, SQL to {sql_entries[vid]}"
    # every row read here carries its vector (rows_by_vec_ids reads them all)
    want = np.concatenate([c.vectors for c in rows]).astype(np.float32, copy=False)
    want_ids = np.concatenate([c.vector_ids for c in rows])
    return _vectors_mismatch(loaded.index, want_ids, want)


def _vectors_mismatch(index: faiss.IndexIDMap2, vec_ids: np.ndarray, want: np.ndarray) -> str | None:
    """Compare what ``index`` holds for ``vec_ids`` (m,) with the stored unit vectors ``want`` (m, d)."""
    got = _reconstruct(index, vec_ids, want)
    if got is None:
        return _search_mismatch(index, vec_ids, want)
    err = np.linalg.norm(got.astype(np.float64) - want, axis=1)
    ref = np.linalg.norm(_codec_roundtrip(index, want).astype(np.float64) - want, axis=1)
    bad = np.flatnonzero(~(err <= 2 * ref + ABS_TOL))  # (NaN from garbage counts as bad)
    if len(bad):
        i = int(bad[0])
        return (
            f"{len(bad)} of {len(vec_ids)} sampled vectors differ from SQL's (vec_id {int(vec_ids[i])}: "
            f"distance {err[i]:.3g}, codec error {ref[i]:.3g})"
        )
    return None


def _reconstruct(index: faiss.IndexIDMap2, vec_ids: np.ndarray, want: np.ndarray) -> np.ndarray | None:
    """The decoded vectors (m, d) the index holds for ``vec_ids``, or None when it cannot reconstruct."""
    out = np.empty((len(vec_ids), index.d), dtype=np.float32)
    try:
        for j, vid in enumerate(vec_ids.tolist()):
            out[j] = index.reconstruct(vid)
        return out
    except RuntimeError:
        pass
    ivf = faiss.try_extract_index_ivf(index.index)
    if ivf is None:
        return None
    return _ivf_reconstruct(index, ivf, vec_ids, want)


def _list_ids(invlists: faiss.InvertedLists, list_no: int) -> np.ndarray:
    """The internal ids of one inverted list, (size,) int64 (a copy; codes are not read)."""
    size = invlists.list_size(list_no)
    if size == 0:
        return np.empty(0, dtype=np.int64)
    ptr = invlists.get_ids(list_no)
    try:
        return faiss.rev_swig_ptr(ptr, size).copy()
    finally:
        invlists.release_ids(list_no, ptr)


def _ivf_reconstruct(
    index: faiss.IndexIDMap2, ivf: faiss.IndexIVF, vec_ids: np.ndarray, want: np.ndarray
) -> np.ndarray | None:
    """Reconstruct from the inverted lists (IVF keeps no id -> list map unless asked to, at a cost).

    IDMap2 adds to the inner index with sequential internal ids: position i of ``id_map`` is internal id i.
    Each vector is looked up first in the list its stored vector is assigned to (where it was added);
    a vector not found there is looked for in every list. None if one is nowhere (a mismatch then shows).
    """
    id_map = faiss.vector_to_array(index.id_map)
    internal_of = {int(id_map[i]): int(i) for i in np.flatnonzero(np.isin(id_map, vec_ids)).tolist()}
    if len(internal_of) != len(vec_ids):
        return None
    where: dict[int, tuple[int, int]] = {}  # internal id -> (list, offset)
    invlists = ivf.invlists
    _, assigned = ivf.quantizer.search(np.ascontiguousarray(want, dtype=np.float32), 1)
    for list_no in sorted(set(assigned[:, 0].tolist()) - {-1}):
        for off, iid in enumerate(_list_ids(invlists, list_no).tolist()):
            where.setdefault(iid, (list_no, off))
    needed = {internal_of[v] for v in vec_ids.tolist()}
    if not needed <= where.keys():
        for list_no in range(ivf.nlist):
            for off, iid in enumerate(_list_ids(invlists, list_no).tolist()):
                if iid in needed:
                    where.setdefault(iid, (list_no, off))
    out = np.empty((len(vec_ids), index.d), dtype=np.float32)
    for j, vid in enumerate(vec_ids.tolist()):
        loc = where.get(internal_of[vid])
        if loc is None:
            return None
        ivf.reconstruct_from_offset(loc[0], loc[1], faiss.swig_ptr(out[j]))
    return out


def _codec_roundtrip(index: faiss.IndexIDMap2, x: np.ndarray) -> np.ndarray:
    """``x`` encoded and decoded by the index's codec (its own storage for HNSW); ``x`` if it has none."""
    inner = faiss.downcast_index(index.index)
    codec = faiss.downcast_index(inner.storage) if hasattr(inner, "storage") else inner
    try:
        return codec.sa_decode(codec.sa_encode(np.ascontiguousarray(x, dtype=np.float32)))
    except RuntimeError:  # no standalone codec: compare with the stored vectors themselves
        return x


def _search_mismatch(index: faiss.IndexIDMap2, vec_ids: np.ndarray, want: np.ndarray) -> str | None:
    """For an index that cannot reconstruct: each stored vector must find its own vec_id in its top-k."""
    k = min(SEARCH_K, int(index.ntotal))
    if k == 0:
        return None
    _, labels = index.search(np.ascontiguousarray(want, dtype=np.float32), k)
    lost = [int(v) for v, row in zip(vec_ids.tolist(), labels.tolist(), strict=True) if v not in row]
    if lost:
        return (
            f"{len(lost)} of {len(vec_ids)} sampled stored vectors do not find themselves (vec_id {lost[0]})"
        )
    return None
