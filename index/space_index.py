"""The FAISS index of one embedding space, with its in-memory id lookup and on-disk snapshots.

FAISS ids are ``vec_id``s (see :mod:`index.tables`): every stored vector has its own, a replaced vector
gets a new one. The index is an ``IndexIDMap2`` around whatever the factory string builds, with inner
product as the metric; vectors are unit-norm, so scores are cosine similarities.

Deletion: index types that remove ids in place (the flat-codes family: Flat, SQ, PQ) remove them. Types
that cannot (HNSW*, and IVF* whose removal does not renumber the ids IDMap2 relies on) keep the stale
vector and record its vec_id as a *tombstone*; searches pass a FAISS ``IDSelector``
that excludes tombstones (``SearchParameters(sel=IDSelectorNot(IDSelectorBatch(tombstones)))``), so FAISS
itself skips them while walking the graph / scanning the lists and still returns up to ``k`` live results. The id -> item lookup
drops the entry at once as well, so a tombstoned id could never be reported even if FAISS returned it.
When tombstones exceed ``tombstone_fraction`` of the index, the owner rebuilds it from SQL
(:meth:`needs_rebuild`).

Trainable factories (``IVF...``) cannot hold vectors before training. Until the space holds ``min_train``
vectors, the space is served by an exact ``Flat`` *staging* index; when it reaches ``min_train`` the
owner rebuilds it with the real factory, trained on the stored vectors (:meth:`needs_rebuild`).

Background builds (``background=True``): every approximate factory (HNSW, IVF...) is staged like a
trainable one, served exactly by ``Flat`` until ``min_train`` vectors, and the owner builds the real index
off to the side (:mod:`index.background_build`) while searches and writes go on. Writes applied meanwhile
are also recorded in a *delta* (:meth:`begin_delta`); :meth:`install` replays it onto the built index
(idempotently: vec_ids are never reused, so "add if absent, remove if present" in commit order is exact
whatever the build read) and swaps it in. ``last_build`` reports the build and its measured recall.

Thread-safety: ``lock`` is a readers-writer lock. :meth:`search` takes it shared; :meth:`apply` and
:meth:`swap` take it exclusively and change the index and the lookup together, so a reader never sees
one without the other. Rebuilding is done on a separate index off to the side and swapped in by reference.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable
from pathlib import Path

import faiss
import numpy as np

from . import snapshot
from .config import IndexConfig
from .errors import InvalidInput
from .rwlock import RWLock
from .snapshot import Entry
from .types import Hit

log = logging.getLogger(__name__)

STAGING_FACTORY = "Flat"

_IDMAP_PREFIX = re.compile(r"^\s*IDMap2?\s*,\s*", re.IGNORECASE)


def normalize_factory(factory: str) -> str:
    """Strip an ``IDMap``/``IDMap2`` prefix (the gallery always adds its own IDMap2) and blanks."""
    if not isinstance(factory, str) or not factory.strip():
        raise ValueError(f"index factory must be a non-empty FAISS factory string, not {factory!r}")
    return _IDMAP_PREFIX.sub("", factory).strip()


def _default_params(inner: faiss.Index) -> str:
    """Search parameters used when none are given: FAISS defaults are tuned for speed, not recall."""
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        return f"nprobe={min(ivf.nlist, 16)}"
    if hasattr(faiss.downcast_index(inner), "hnsw"):
        return "efSearch=128"
    return ""


def make_faiss_index(factory: str, dim: int, params: str | None = None) -> faiss.IndexIDMap2:
    """``IndexIDMap2`` over ``faiss.index_factory(dim, factory, inner product)``, search params applied.

    ``params`` uses FAISS ``ParameterSpace`` syntax (``"nprobe=16"``, ``"efSearch=128"``); None picks
    :func:`_default_params`, ``""`` keeps FAISS's defaults.
    """
    inner = faiss.index_factory(dim, normalize_factory(factory), faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexIDMap2(inner)
    set_params(index, _default_params(inner) if params is None else params)
    return index


def set_params(index: faiss.Index, params: str) -> None:
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)


def default_min_train(index: faiss.Index) -> int:
    """Vectors needed before a trainable index is trained: 39 per IVF list (FAISS's own warning level)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return max(39 * int(ivf.nlist), 1)
    return 10_000


def can_remove(index: faiss.IndexIDMap2) -> bool:
    """Whether ``IndexIDMap2.remove_ids`` is correct for this index.

    IDMap2 removes from the inner index and then compacts its id map, which is right only when the inner
    index compacts its storage in order too: the flat-codes family (Flat, SQ, PQ, LSH). IVF removes
    without renumbering (the id map would then point at the wrong vectors) and HNSW cannot remove at
    all; those use tombstones.
    """
    return isinstance(faiss.downcast_index(index.index), faiss.IndexFlatCodes)


def _search_params(
    index: faiss.IndexIDMap2, sel: faiss.IDSelector, share: float = 1.0, k: int = 1
) -> faiss.SearchParameters:
    """Per-call search parameters carrying ``sel`` and the index's own tuning.

    A fresh object per call on purpose: ``IndexIDMap2.search`` temporarily rewrites ``params.sel`` in
    place (const_cast) to translate ids, so one params object shared by concurrent searches would race.

    ``share`` < 1 is the fraction of the index ``sel`` allows (a filter): an approximate index then looks
    wider in proportion (``nprobe / share`` lists, an HNSW candidate list of ``max(efSearch, k) / share``,
    both capped by the index's size), so about as many allowed vectors are visited as without a filter.
    """
    inner = faiss.downcast_index(index.index)
    ivf = faiss.try_extract_index_ivf(inner)
    widen = 1.0 / max(share, 1e-9)
    if ivf is not None:
        nprobe = ivf.nprobe if share >= 1.0 else min(int(ivf.nlist), math.ceil(ivf.nprobe * widen))
        return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
    if hasattr(inner, "hnsw"):
        ef = inner.hnsw.efSearch
        if share < 1.0:
            ef = max(ef, min(int(index.ntotal), math.ceil(max(ef, k) * widen)))
        return faiss.SearchParametersHNSW(sel=sel, efSearch=ef)
    return faiss.SearchParameters(sel=sel)


class SpaceIndex:
    """FAISS index + vec_id lookup + tombstones of one space. See the module docstring."""

    def __init__(self, space: str, dim: int, config: IndexConfig | None = None) -> None:
        """``config``: the gallery's index options (factory, params, min_train, tombstone_fraction,
        background_builds are used here); None: the defaults."""
        config = config if config is not None else IndexConfig()
        factory, params, min_train = config.factory, config.params, config.min_train
        self.config = config
        self.space = space
        self.dim = int(dim)
        self.factory = normalize_factory(factory)
        self.params = params
        self.tombstone_fraction = float(config.tombstone_fraction)
        self.lock = RWLock()
        try:
            probe = make_faiss_index(self.factory, self.dim, params)
        except RuntimeError as e:  # FAISS's own message says what is wrong with the string
            raise InvalidInput(
                f"index factory {factory!r} (params {params!r}) cannot build an index of dim {dim}: "
                f"{str(e).strip().splitlines()[-1]}"
            ) from None
        self.trainable = not probe.is_trained
        self.background = bool(config.background_builds)
        exact = isinstance(faiss.downcast_index(probe.index), faiss.IndexFlat)
        # staged: served by the exact Flat index until the real one is built (trained, or off to the side)
        self.uses_staging = self.trainable or (self.background and not exact)
        self.min_train = int(min_train) if min_train is not None else default_min_train(probe)
        self._index: faiss.IndexIDMap2 = self.empty_index(trained=False)
        self._entries: dict[int, Entry] = {}
        self._tombstones: set[int] = set()
        self._selector: tuple[faiss.IDSelector, faiss.IDSelector] | None = None
        self.changes_since_snapshot = 0
        self.mutations = 0  # bumped (under the write lock) by every change of the index or its lookup
        self._delta: (
            list[tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, list[Entry] | None]] | None
        ) = None
        self.last_build: dict | None = None  # the last background build's report (index.background_build)
        self.build_progress: dict | None = None  # while one runs: {"reason", "started_at", "done", "total"}

    # ----------------------------------------------------------------- building
    def empty_index(self, trained: bool) -> faiss.IndexIDMap2:
        """A new empty index: the real factory, or the Flat staging index while untrained."""
        if self.uses_staging and not trained:
            return make_faiss_index(STAGING_FACTORY, self.dim, "")
        return make_faiss_index(self.factory, self.dim, self.params)

    @property
    def removable(self) -> bool:
        """Whether the current index removes ids in place (else deletions are tombstoned)."""
        return can_remove(self._index)

    @property
    def staging(self) -> bool:
        """True while a trainable (or background-built) factory is served by the exact staging index."""
        return self.uses_staging and self.built_factory == STAGING_FACTORY

    @property
    def built_factory(self) -> str:
        inner = faiss.downcast_index(self._index.index)
        if self.uses_staging and isinstance(inner, faiss.IndexFlat):
            return STAGING_FACTORY
        return self.factory

    def build(
        self, chunks: Iterable[tuple[np.ndarray, np.ndarray]], train: np.ndarray | None
    ) -> faiss.IndexIDMap2:
        """Build a new index (not installed) from ``(vec_ids (n,), vectors (n, d))`` chunks.

        ``train`` (m, d) trains a trainable factory; None (or a trainable factory with too few training
        vectors) builds the staging index.
        """
        trained = train is not None and len(train) >= self.min_train
        index = self.empty_index(trained=trained)
        if self.trainable and trained:
            assert train is not None  # trained implies it
            t0 = time.perf_counter()
            index.train(np.ascontiguousarray(train, dtype=np.float32))
            log.info(
                "space %r: trained %s on %d vectors in %.2fs",
                self.space,
                self.factory,
                len(train),
                time.perf_counter() - t0,
            )
        for ids, vecs in chunks:
            if len(ids):
                index.add_with_ids(
                    np.ascontiguousarray(vecs, dtype=np.float32), ids.astype(np.int64, copy=False)
                )
        return index

    def swap(
        self, index: faiss.IndexIDMap2, entries: dict[int, Entry], tombstones: Iterable[int] = ()
    ) -> None:
        """Install a built index and its lookup atomically (for readers)."""
        tomb = set(tombstones)
        selector = self._make_selector(tomb)
        with self.lock.write():
            self._index, self._entries, self._tombstones, self._selector = index, entries, tomb, selector
            self.mutations += 1

    # ----------------------------------------------------------------- mutation
    def apply(
        self,
        remove: np.ndarray | None = None,
        add_ids: np.ndarray | None = None,
        add_vectors: np.ndarray | None = None,
        add_entries: list[Entry] | None = None,
    ) -> None:
        """Remove vec_ids, then add ``(add_ids (n,), add_vectors (n, d), add_entries)``, as one step for readers.

        Removing an id the index does not hold is a no-op.
        """
        with self.lock.write():
            self.mutations += 1
            if self._delta is not None:  # a background build is running: it replays this at install
                self._delta.append(
                    (
                        None if remove is None else np.array(remove, dtype=np.int64),
                        None if add_ids is None else np.array(add_ids, dtype=np.int64),
                        None if add_vectors is None else np.array(add_vectors, dtype=np.float32),
                        None if add_entries is None else list(add_entries),
                    )
                )
            if remove is not None and len(remove):
                rm = np.asarray(remove, dtype=np.int64)
                # every live id is in ``_entries``; an id absent there is not (live) in the index
                live = [vid for vid in rm.tolist() if self._entries.pop(vid, None) is not None]
                if live and self.removable:
                    self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(live, dtype=np.int64)))
                elif live:
                    self._tombstones.update(live)
                    self._selector = self._make_selector(self._tombstones)
                self.changes_since_snapshot += len(rm)
            if add_ids is not None and len(add_ids):
                assert add_vectors is not None and add_entries is not None
                self._index.add_with_ids(add_vectors, np.asarray(add_ids, dtype=np.int64))
                for vid, entry in zip(add_ids.tolist(), add_entries, strict=True):
                    self._entries[vid] = entry
                self.changes_since_snapshot += len(add_ids)

    def begin_delta(self) -> None:
        """Start recording applied writes for a build in progress. Call with mutations excluded (the
        gallery's mutex), before the build reads SQL, so every later commit is either read or recorded."""
        with self.lock.write():
            self._delta = []

    def end_delta(self) -> None:
        """Stop recording (a build failed or was cancelled)."""
        with self.lock.write():
            self._delta = None

    def install(self, index: faiss.IndexIDMap2, entries: dict[int, Entry]) -> int:
        """Replay the recorded delta onto a built ``index`` (and its ``entries``), then swap them in, atomically
        for readers. Returns how many recorded operations were replayed. Call with mutations excluded."""
        removable = can_remove(index)
        tombstones: set[int] = set()
        with self.lock.write():
            delta, self._delta = self._delta or [], None
            for remove, add_ids, add_vectors, add_entries in delta:
                if remove is not None and len(remove):
                    live = [vid for vid in remove.tolist() if entries.pop(vid, None) is not None]
                    if live and removable:
                        index.remove_ids(faiss.IDSelectorBatch(np.asarray(live, dtype=np.int64)))
                    else:
                        tombstones.update(live)
                if add_ids is not None and len(add_ids):
                    assert add_vectors is not None and add_entries is not None
                    new = np.fromiter(
                        (vid not in entries for vid in add_ids.tolist()), dtype=bool, count=len(add_ids)
                    )
                    if new.any():
                        index.add_with_ids(np.ascontiguousarray(add_vectors[new]), add_ids[new])
                        for vid, e, keep in zip(add_ids.tolist(), add_entries, new.tolist(), strict=True):
                            if keep:
                                entries[vid] = e
            self._index, self._entries, self._tombstones = index, entries, tombstones
            self._selector = self._make_selector(tombstones)
            self.mutations += 1
            self.changes_since_snapshot = max(self.changes_since_snapshot, len(entries))
        return len(delta)

    def _make_selector(self, tombstones: set[int]) -> tuple[faiss.IDSelector, faiss.IDSelector] | None:
        if not tombstones:
            return None
        batch = faiss.IDSelectorBatch(np.fromiter(tombstones, dtype=np.int64, count=len(tombstones)))
        # keep ``batch`` referenced: IDSelectorNot does not own it
        return faiss.IDSelectorNot(batch), batch

    def needs_rebuild(self) -> str | None:
        """Why the index should be rebuilt from SQL now (a message), or None."""
        if self.staging and len(self._entries) >= self.min_train:
            return f"{len(self._entries)} vectors reached min_train={self.min_train}: training {self.factory}"
        n = self._index.ntotal
        if self._tombstones and len(self._tombstones) > self.tombstone_fraction * n:
            return f"{len(self._tombstones)} tombstones of {n} vectors exceed {self.tombstone_fraction:.0%}"
        return None

    # ----------------------------------------------------------------- reading
    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, allows_all_at: int | None = None
    ) -> list[list[Hit]]:
        """Top-``k`` live hits for each row of ``queries`` (n, d) float32 unit rows, best first.

        Fewer than ``k`` hits when the space holds fewer live vectors. ``allowed`` (m,) int64 vec_ids, if
        given, restricts the search to those ids *inside* FAISS (an ``IDSelectorBatch``, and-ed with the
        tombstone selector), so an exact index returns ``min(k, live allowed)`` hits; an approximate one
        (HNSW, IVF) looks wider in proportion to the share allowed (:func:`_search_params`) but may still
        return fewer (the gallery then answers those queries exactly). ``allows_all_at``: the value of
        :attr:`mutations` when ``allowed`` was found to hold every live id; while nothing changed since, the
        search runs without the selector (the same answer, without its cost).
        """
        n = len(queries)
        if allowed is not None and len(allowed) == 0:
            return [[] for _ in range(n)]
        lock = self.lock
        lock.acquire_read()  # (not ``with``: this is the hot path)
        try:
            index, entries, selector = self._index, self._entries, self._selector
            if allowed is not None and allows_all_at is not None and allows_all_at == self.mutations:
                allowed = None
            kk = min(k, len(entries))
            if allowed is not None:
                kk = min(kk, len(allowed))
            if kk == 0 or n == 0:
                return [[] for _ in range(n)]
            if allowed is not None:
                batch = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
                # IDSelectorAnd does not own its parts: ``batch`` and ``selector`` stay referenced meanwhile
                sel = batch if selector is None else faiss.IDSelectorAnd(batch, selector[0])
                share = len(allowed) / max(len(entries), 1)
                scores, labels = index.search(queries, kk, params=_search_params(index, sel, share, kk))
            elif selector is None:
                scores, labels = index.search(queries, kk)
            else:
                scores, labels = index.search(queries, kk, params=_search_params(index, selector[0]))
            out: list[list[Hit]] = []
            get = entries.get
            for srow, lrow in zip(scores.tolist(), labels.tolist(), strict=True):
                hits = []
                for s, vid in zip(srow, lrow, strict=True):
                    # -1: fewer results than k; a missing entry cannot happen (same lock), but never fail
                    e = get(vid)
                    if e is not None:
                        hits.append(Hit.of(e, s))
                out.append(hits)
            return out
        finally:
            lock.release_read()

    def live_ids(self) -> tuple[np.ndarray, int]:
        """Every vec_id searches can return (tombstones excluded), int64 (live_count,), unordered, and the
        value of :attr:`mutations` they are the ids of."""
        with self.lock.read():
            return np.fromiter(self._entries.keys(), dtype=np.int64, count=len(self._entries)), self.mutations

    def index_ids(self) -> np.ndarray:
        """Every vec_id physically in the FAISS index (tombstones included), int64 (ntotal,)."""
        with self.lock.read():
            return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=True)

    @property
    def live_count(self) -> int:
        """Vectors that searches can return (FAISS ntotal minus tombstones)."""
        return self._index.ntotal - len(self._tombstones)

    @property
    def ntotal(self) -> int:
        return self._index.ntotal

    @property
    def exact(self) -> bool:
        """Whether searches are exact now (the serving index is Flat)."""
        return isinstance(faiss.downcast_index(self._index.index), faiss.IndexFlat)

    @property
    def tombstone_count(self) -> int:
        return len(self._tombstones)

    @property
    def entries(self) -> dict[int, Entry]:
        return self._entries

    @property
    def faiss_index(self) -> faiss.IndexIDMap2:
        return self._index

    # ----------------------------------------------------------------- snapshots
    def save(self, index_dir: Path) -> snapshot.SnapshotInfo:
        """Write this space's snapshot (see :mod:`index.snapshot`).

        The caller must exclude mutations (the gallery holds its mutation mutex); searches continue.
        """
        with self.lock.read():
            info = snapshot.new_info(
                self.space, self.factory, self.built_factory, self.dim, self._index, len(self._entries)
            )
            info = snapshot.write(index_dir, self._index, snapshot.EntryArrays.from_dict(self._entries), info)
        self.changes_since_snapshot = 0
        return info

    def load_snapshot(self, index_dir: Path) -> snapshot.Loaded | None:
        """Read this space's snapshot if it matches (dim, factory), with search parameters applied."""
        loaded = snapshot.read(index_dir, self.space, self.dim, self.factory)
        if loaded is not None:
            inner = faiss.downcast_index(loaded.index.index)
            is_staging = self.uses_staging and isinstance(inner, faiss.IndexFlat)
            set_params(
                loaded.index,
                "" if is_staging else (_default_params(inner) if self.params is None else self.params),
            )
        return loaded
