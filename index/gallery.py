"""The gallery façade: a durable SQL store of embeddings with one FAISS index per embedding space.

Write path (add / upsert / reembed / delete): inputs are validated first (typed errors, nothing changed);
then, under the gallery's mutation mutex, one SQL transaction commits; only then the space's FAISS index
is mutated under its write lock. A call that returned is therefore durable (see :mod:`index.db`), and
vec_id order == commit order == FAISS apply order. Search path: the space's read lock and FAISS only —
no SQL — so searches run concurrently with each other and wait for writers at most one FAISS mutation.

Restart: :meth:`Gallery.open` loads each space's snapshot and reconciles it with SQL
(:mod:`index.reconcile`), so the index always equals the database, whatever was or was not snapshotted
before a crash. One ``Gallery`` per process and per index dir: FAISS indexes are per process.

Replicas: several processes may open one database (each with its own index dir). Each one's writes are
exact in SQL at once; :meth:`Gallery.follow`, called periodically, brings this process's FAISS indexes up to
what the others committed (the service calls it every ``follow_interval_s``).

Choices callers should know:
- vectors (stored and queries) are L2-normalised on input; scores are cosine similarities;
- ``delete`` of an unknown external id raises :class:`ItemNotFound` and deletes nothing (``missing_ok=True``
  ignores unknown ids instead); a batch is all-or-nothing;
- deletion on index types that cannot remove ids (HNSW, IVF): see :mod:`index.space_index` (tombstones
  filtered inside FAISS by an ``IDSelector``, rebuild from SQL past ``tombstone_fraction``);
- version metadata is cached per process (versions are immutable once registered); a status changed by
  another process is seen after :meth:`get_version` / :meth:`reconcile`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from . import atomic, backfill, catalog, filters, store
from . import items as item_sql
from .backfill_book import BackfillBook
from .background_build import IndexBuilder, read_report
from .config import UNSET, IndexConfig, Unset
from .db import default_database_url, make_engine
from .errors import (
    ActiveSpaceChanged,
    GalleryClosed,
    InvalidInput,
    ItemNotFound,
    LeaseLost,
    SpaceMismatch,
    UnknownSpace,
    VersionConflict,
)
from .filters import MetadataFilter
from .reconcile import ReconcileReport, reconcile
from .snapshot import SnapshotInfo
from .space_index import SpaceIndex
from .tables import create_schema
from .types import ROUTE_MODEL, ROUTES, Hit, NewItem, VersionInfo, route_label, split_label
from .validation import as_unit_vectors, check_external_ids, check_k, check_metadata, check_text, vectors_of

log = logging.getLogger(__name__)

EXACT_FILTERED_MAX = 10_000
"""A filtered search of an approximate index (HNSW, IVF) whose filter matches at most this many vectors is
answered exactly from the matching vectors in SQL: an approximate index walked with a selective filter
visits few allowed vectors and could return fewer than ``k``. Larger matching sets go through FAISS."""

FILTER_CACHE_TTL_S = 1.0
"""How long the matching vec_ids of a filter (one SQL query) are reused when this process wrote nothing
meanwhile: any write of this gallery object drops them at once, so its own writes are always seen; writes of
other processes (replicas) are seen by filters within this many seconds."""
FILTER_CACHE_BYTES = 128 << 20
"""Most memory the cached matching sets (ids, and the vectors of small sets) may take."""


class Gallery:
    """Durable FAISS + SQL store of embeddings that knows which model version made each.

    Create with :meth:`open`. Thread-safe: any number of threads may search while others mutate.
    """

    def __init__(
        self,
        engine: Engine,
        data_dir: Path,
        config: IndexConfig | None = None,
        index_dir: Path | None = None,
    ) -> None:
        """Use :meth:`open`; this constructor neither creates tables nor loads indexes."""
        self.engine = engine
        self.data_dir = Path(data_dir)
        self.index_dir = Path(index_dir) if index_dir is not None else self.data_dir / "index"
        self.config = config if config is not None else IndexConfig()
        self._mutex = threading.RLock()  # serialises mutations (SQL commit + FAISS apply)
        self.backfill = BackfillBook(
            engine, self._check_open, self._version, self.space_dim
        )  # jobs, pending items, orders
        self._versions: dict[str, VersionInfo] = {}
        self._spaces: dict[str, SpaceIndex] = {}
        self._closed = False
        self._items = 0  # items in SQL, kept in step with this process's commits (O(1) for policy checks)
        # The database's change counter (store.head) up to which this process has applied every commit:
        # its own, and (through follow) those of other processes writing to the same database.
        self._followed = 0
        # filters: (space, filter) -> (write generation, time, vec_ids, rows of small sets or None)
        self._generation = 0  # bumped by every write of this object (after its commit)
        self._filter_cache: OrderedDict[tuple[str, MetadataFilter], _Matching] = OrderedDict()
        self._filter_lock = threading.Lock()
        self.last_open_reports: list[ReconcileReport] = []
        self._builder = IndexBuilder(
            engine, self.index_dir, self._mutex, self.config, on_installed=self._maybe_snapshot
        )

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def open(
        cls,
        database_url: str | None,
        data_dir: Path,
        index_factory: str | Unset = UNSET,
        snapshot_every: int | None | Unset = UNSET,
        *,
        config: IndexConfig | None = None,
        sqlite_synchronous: str = "FULL",
        index_params: str | None | Unset = UNSET,
        min_train: int | None | Unset = UNSET,
        tombstone_fraction: float | Unset = UNSET,
        faiss_threads: int | None | Unset = UNSET,
        background_builds: bool | Unset = UNSET,
        recall_sample: int | Unset = UNSET,
        index_dir: Path | None = None,
    ) -> Gallery:
        """Open (creating if needed) the gallery at ``database_url`` with snapshots under ``data_dir``.

        - ``database_url``: any SQLAlchemy URL; None means SQLite at ``<data_dir>/gallery.db``.
        - ``config``: the index options (:class:`IndexConfig`; None: its defaults). The keyword arguments
          ``index_factory``, ``snapshot_every``, ``index_params``, ``min_train``, ``tombstone_fraction``,
          ``faiss_threads``, ``background_builds`` and ``recall_sample`` are that config's fields by
          their older names: each one given replaces the field (``index_factory`` is ``factory``,
          ``index_params`` is ``params``). Snapshots only make reopening faster; SQL is the truth.
        - ``sqlite_synchronous``: SQLite's ``synchronous`` pragma (:mod:`index.db`).
        - ``index_dir``: where snapshots go (None: ``<data_dir>/index``). Processes that share a database
          and a data_dir (replicas) each need their own: FAISS indexes are per process.
        - ``faiss_threads`` sets FAISS's OpenMP threads of the calling thread (OpenMP keeps it per thread).
          Many concurrent single-query searches run faster with 1 thread each than with all of them
          fighting over OpenMP.
        """
        config = (config or IndexConfig()).overridden(
            index_factory=index_factory,
            snapshot_every=snapshot_every,
            index_params=index_params,
            min_train=min_train,
            tombstone_fraction=tombstone_fraction,
            faiss_threads=faiss_threads,
            background_builds=background_builds,
            recall_sample=recall_sample,
        )
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        if config.faiss_threads is not None:
            faiss.omp_set_num_threads(int(config.faiss_threads))
        engine = make_engine(
            database_url or default_database_url(data_dir), sqlite_synchronous=sqlite_synchronous
        )
        create_schema(engine)
        g = cls(engine, data_dir, config, index_dir)
        try:
            g._load()
        except BaseException:
            engine.dispose()
            raise
        return g

    def _load(self) -> None:
        self.index_dir.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_temp_files(self.index_dir)
        with self._mutex, self.engine.connect() as conn:
            self._followed = store.head(conn)  # read first: the reconcile below sees at least this much
            self._versions = {v.version: v for v in catalog.list_versions(conn)}
            dims = catalog.space_dims(conn)
            self._items = store.item_count(conn)
        for space, dim in sorted(dims.items()):
            sidx = self._new_space_index(space, dim)
            self.last_open_reports.append(reconcile(self.engine, sidx, self.index_dir))
            self._spaces[space] = sidx
            if self.config.background_builds and not sidx.staging:
                sidx.last_build = read_report(self.index_dir, space, sidx.factory)
            self._maybe_snapshot(sidx)
            with self._mutex:
                self._rebuild_if_needed(sidx)

    def _new_space_index(self, space: str, dim: int) -> SpaceIndex:
        return SpaceIndex(space, dim, self.config)

    def close(self) -> None:
        """Stop background builds, snapshot every changed space and release the database. Idempotent."""
        self._builder.close()
        with self._mutex:
            if self._closed:
                return
            try:
                for sidx in self._spaces.values():
                    if sidx.changes_since_snapshot:
                        sidx.save(self.index_dir)
            finally:
                self._closed = True
                self.engine.dispose()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise GalleryClosed("the gallery is closed")

    def snapshot(self, space: str | None = None) -> list[SnapshotInfo]:
        """Write snapshots now (of ``space``, or of every space). Searches continue meanwhile."""
        self._check_open()
        with self._mutex:
            targets = [self._space_index(space)] if space is not None else list(self._spaces.values())
            return [s.save(self.index_dir) for s in targets]

    def reconcile(self, space: str | None = None, *, rebuild: bool = False) -> list[ReconcileReport]:
        """Re-sync FAISS with SQL (e.g. after another process wrote to the database).

        ``rebuild=True`` ignores the in-memory index and rebuilds from SQL; otherwise the current index
        is first snapshotted and then reconciled like on open.
        """
        self._check_open()
        with self._mutex:
            self._discover_spaces()
            with self.engine.connect() as conn:
                self._items = store.item_count(conn)
            targets = [self._space_index(space)] if space is not None else list(self._spaces.values())
            self._generation += 1
            out = []
            for sidx in targets:
                if not rebuild:
                    sidx.save(self.index_dir)
                out.append(reconcile(self.engine, sidx, None if rebuild else self.index_dir))
            return out

    # ------------------------------------------------------------------ versions
    def register_version(self, info: VersionInfo) -> VersionInfo:
        """Register a model version (idempotent for an identical definition). Creates its space if new.

        Raises :class:`VersionConflict` (same name, other definition), :class:`DimensionMismatch`
        (the space exists with another dim), :class:`InvalidInput` (bad names, card not JSON).
        """
        self._check_open()
        with self._mutex:
            new_space = None
            if (
                info.space not in self._spaces
                and isinstance(info.embedding_dim, int)
                and info.embedding_dim > 0
            ):
                # before committing: refuses a factory that cannot index this dim (e.g. PQ sizes)
                new_space = self._new_space_index(info.space, info.embedding_dim)
            try:
                with self.engine.begin() as conn:
                    stored = catalog.register_version(conn, info)
            except IntegrityError:  # registered concurrently by another process: compare with it
                with self.engine.begin() as conn:
                    stored = catalog.register_version(conn, info)
            self._versions[stored.version] = stored
            if stored.space not in self._spaces:
                sidx = new_space or self._new_space_index(stored.space, stored.embedding_dim)
                reconcile(self.engine, sidx, self.index_dir)  # drops any leftover snapshot content
                self._spaces[stored.space] = sidx
            return stored

    def get_version(self, version: str) -> VersionInfo:
        """The registered version (fresh from SQL); :class:`UnknownVersion` if none."""
        self._check_open()
        with self.engine.connect() as conn:
            info = catalog.get_version(conn, version)
        self._versions[version] = info
        return info

    def list_versions(self) -> list[VersionInfo]:
        self._check_open()
        with self.engine.connect() as conn:
            return catalog.list_versions(conn)

    def set_version_status(self, version: str, status: str) -> VersionInfo:
        """Mark a version ``registered`` or ``retired``. Retired versions cannot write embeddings."""
        self._check_open()
        with self._mutex:
            with self.engine.begin() as conn:
                info = catalog.set_version_status(conn, version, status)
            self._versions[version] = info
            return info

    def active_version(self) -> str | None:
        """The persisted active version (read from SQL, so replicas agree), or None."""
        self._check_open()
        with self.engine.connect() as conn:
            return catalog.get_active(conn)

    def set_active_version(
        self,
        version: str,
        *,
        rollback: bool = False,
        note: dict[str, Any] | None = None,
        require_complete_space: bool = False,
    ) -> VersionInfo:
        """Persist ``version`` as the active one (and in the activation history; ``rollback=True`` pops the
        current entry instead, ``version`` must be the one before it). ``note`` (JSON-able) is kept in the
        activation log with it. Policy (space compatibility) is the caller's; ``require_complete_space``
        refuses (:class:`VersionConflict`, nothing changed) when any item lacks an embedding in the version's
        space, counted in SQL under the writer lock (a switch of space, with other writers about)."""
        self._check_open()
        with self._mutex:
            with self.engine.begin() as conn:
                # Take the writer lock first: two activations at once (two replicas) then run one after the
                # other, and each reads the state the other committed (else both could leave their
                # version marked active, or lose an entry of the history).
                store.allocate_vec_ids(conn, 0)
                previous = catalog.get_active(conn)
                if require_complete_space:
                    # Counted in SQL under the lock: this process's counts miss other replicas' writes not
                    # followed yet, and an item without an embedding in the space would be unsearchable.
                    space = catalog.get_version(conn, version).space
                    lacking = store.item_count(conn) - store.space_count(conn, space)
                    if lacking:
                        raise VersionConflict(
                            f"version {version!r} cannot serve: {lacking} items have no embedding in its "
                            f"space {space!r} (written meanwhile, maybe through another replica); "
                            "backfill them first"
                        )
                info = catalog.set_active(conn, version, rollback=rollback, note=note)
            self._versions[version] = info
            if previous is not None and previous != version and previous in self._versions:
                self.get_version(previous)
            return info

    def activation_log(self) -> list[dict[str, Any]]:
        """Every activation, oldest first: version, time (ISO), rollback, and the note it was given."""
        self._check_open()
        with self.engine.connect() as conn:
            return catalog.activation_log(conn)

    def activation_history(self) -> list[str]:
        """Versions activated so far, oldest first (the last is the active one); persisted in SQL."""
        self._check_open()
        with self.engine.connect() as conn:
            return catalog.activation_history(conn)

    def _version(self, version: str) -> VersionInfo:
        info = self._versions.get(version)
        if info is None:
            info = self.get_version(version)  # registered by another process?
        return info

    # ------------------------------------------------------------------ spaces
    def spaces(self) -> list[str]:
        """Every known embedding space (those of registered versions)."""
        self._check_open()
        return sorted(self._spaces)

    def space_dim(self, space: str) -> int:
        return self._space_index(space).dim

    def _space_index(self, space: str) -> SpaceIndex:
        sidx = self._spaces.get(space)
        if sidx is None:
            with self._mutex:
                self._discover_spaces()
                sidx = self._spaces.get(space)
            if sidx is None:
                raise UnknownSpace(space, self._spaces)
        return sidx

    def _discover_spaces(self) -> None:
        """Pick up spaces of versions registered by another process."""
        with self.engine.connect() as conn:
            dims = catalog.space_dims(conn)
            self._versions.update({v.version: v for v in catalog.list_versions(conn)})
        for space, dim in dims.items():
            if space not in self._spaces:
                sidx = self._new_space_index(space, dim)
                reconcile(self.engine, sidx, self.index_dir)
                self._spaces[space] = sidx

    # ------------------------------------------------------------------ writes
    def add(
        self,
        items: Sequence[NewItem],
        version: str,
        *,
        space: str | None = None,
        expect_active_space: str | None = None,
    ) -> list[int]:
        """Store new items embedded by ``version``; returns their item ids, in input order.

        Vectors (each shape (d,), any float dtype) are L2-normalised on input. ``space``, if given, must be
        ``version``'s space (else :class:`SpaceMismatch`). Refused, with nothing stored: an external id that
        exists already or repeats in the batch (:class:`DuplicateIds`), bad vectors
        (:class:`InvalidEmbedding`, :class:`DimensionMismatch`), unknown or retired versions.
        Acknowledged (returns) only after the SQL transaction committed.

        ``expect_active_space``: the space of the active model the caller embedded with. The write commits
        only if the persisted active version is still of that space (checked under the writer lock), else
        :class:`ActiveSpaceChanged` and nothing is stored: another replica activated a model of another
        space, and these vectors would be invisible to its searches.
        """
        return self._write("add", items, version, space, expect_active_space=expect_active_space)

    def upsert(
        self,
        items: Sequence[NewItem],
        version: str,
        *,
        space: str | None = None,
        expect_active_space: str | None = None,
    ) -> list[int]:
        """Insert new items; for existing ones replace the vector in ``version``'s space (new vec_id) and
        the metadata / source_uri where the given value is not None. Returns item ids in input order.
        ``expect_active_space`` as for :meth:`add`."""
        return self._write("upsert", items, version, space, expect_active_space=expect_active_space)

    def reembed(
        self,
        pairs: Sequence[tuple[str, np.ndarray]],
        version: str,
        *,
        space: str | None = None,
        lease: backfill.JobLease | None = None,
        route: str = ROUTE_MODEL,
    ) -> list[int]:
        """Replace the vectors of existing items by ``version``'s embeddings, in ``version``'s space, in one
        transaction; the items' ``embedded_by`` becomes ``version``. An item without an embedding in that
        space gets one (backfill into a new space; its other spaces are untouched). Unknown external ids:
        :class:`ItemNotFound`, nothing changed. Returns item ids in input order.

        ``route``: ``model`` (``version`` embedded the items' sources) or ``transform`` (the vectors are a
        learned map of the items' stored vectors in another space: an image backfill still re-embeds them).

        ``lease``: a backfill job's write, committed only while its runner holds the job's lease (renewed in
        the same transaction, so a replica taking the job over waits for it or makes it fail with
        :class:`LeaseLost`, nothing written): an item is never written by two owners."""
        if route not in ROUTES:
            raise InvalidInput(f"route must be one of {', '.join(ROUTES)}, not {route!r}")
        items = [NewItem(external_id=e, vector=v) for e, v in pairs]
        return self._write("reembed", items, version, space, lease=lease, route=route)

    def _write(
        self,
        mode: store.WriteMode,
        items: Sequence[Any],
        version: str,
        space: str | None,
        *,
        expect_active_space: str | None = None,
        lease: backfill.JobLease | None = None,
        route: str = ROUTE_MODEL,
    ) -> list[int]:
        self._check_open()
        info = self._version(version)
        if space is not None and space != info.space:
            raise SpaceMismatch(version, info.space, space)
        if info.status == "retired":
            raise VersionConflict(f"version {version!r} is retired and cannot write embeddings")
        items = list(items)
        ext_ids = check_external_ids([getattr(it, "external_id", None) for it in items])
        metas = [getattr(it, "metadata", None) for it in items]
        uris = [getattr(it, "source_uri", None) for it in items]
        for eid, meta, uri in zip(ext_ids, metas, uris, strict=True):
            check_metadata(meta, eid)
            if uri is not None and not isinstance(uri, str):
                raise InvalidInput(f"source_uri of {eid!r} must be a str or None, not {type(uri).__name__}")
            if uri is not None:
                check_text(uri, f"source_uri of {eid!r}")
        vectors = vectors_of(items, info.embedding_dim, info.space)
        sidx = self._space_index(info.space)
        if not items:
            return []
        with self._mutex:
            self._check_open()
            try:
                with self.engine.begin() as conn:
                    res = store.write_embeddings(
                        conn,
                        mode,
                        external_ids=ext_ids,
                        vectors=vectors,
                        version=info.version,
                        space=info.space,
                        metadata=metas,
                        source_uris=uris,
                        route=route,
                    )
                    # fences, under the writer lock the write took first (a raise rolls everything back)
                    if expect_active_space is not None:
                        active = catalog.get_active(conn)
                        now_space = catalog.get_version(conn, active).space if active else None
                        if now_space is not None and now_space != expect_active_space:
                            raise ActiveSpaceChanged(
                                f"the active model is now {active} (space {now_space!r}), activated by "
                                f"another replica, not a model of space {expect_active_space!r}: nothing "
                                "was stored; send the items again"
                            )
                    if lease is not None and not backfill.renew_lease(
                        conn, lease.job_id, lease.owner, lease.lease_s
                    ):
                        raise LeaseLost(
                            f"backfill job {lease.job_id}: another replica took its lease over; "
                            "this batch was not written"
                        )
            except IntegrityError as e:  # only reachable through a concurrent writer in another process
                raise VersionConflict(f"concurrent write conflict, retry: {e.orig}") from e
            self._items += res.inserted
            self._advance(int(res.vec_ids[0]), int(res.vec_ids[-1]))
            tag = route_label(info.version, route)
            entries = [(iid, eid, tag) for iid, eid in zip(res.item_ids, ext_ids, strict=True)]
            self._apply(sidx, res.old_vec_ids, res.vec_ids, vectors, entries)
            log.debug("%s: %d items in space %r by %r", mode, len(items), info.space, info.version)
            return res.item_ids

    def write_item_vectors(
        self,
        item_ids: Sequence[int],
        external_ids: Sequence[str],
        vectors: np.ndarray,
        version: str,
        *,
        route: str,
        lease: backfill.JobLease | None = None,
    ) -> int:
        """Like :meth:`reembed`, for items a job listed itself by id (``item_ids`` ascending with their
        ``external_ids``, ``vectors`` (n, d)): one transaction, fenced by ``lease``. Items deleted since
        they were listed are left out; returns how many were written. The write path of the transform job,
        where the per-item work is so small that looking items up by external id would dominate."""
        self._check_open()
        if route not in ROUTES:
            raise InvalidInput(f"route must be one of {', '.join(ROUTES)}, not {route!r}")
        info = self._version(version)
        if info.status == "retired":
            raise VersionConflict(f"version {version!r} is retired and cannot write embeddings")
        ids = np.asarray(item_ids, dtype=np.int64)
        if len(ids) != len(external_ids) or len(ids) != len(vectors):
            raise InvalidInput("item_ids, external_ids and vectors must have the same length")
        if len(ids) == 0:
            return 0
        if np.any(np.diff(ids) <= 0):
            raise InvalidInput("item_ids must be ascending and distinct")
        vecs = as_unit_vectors(vectors, info.embedding_dim, info.space, what="vector")
        sidx = self._space_index(info.space)
        with self._mutex:
            self._check_open()
            with self.engine.begin() as conn:
                res, keep = store.write_item_vectors(
                    conn, item_ids=ids, vectors=vecs, version=info.version, space=info.space, route=route
                )
                if lease is not None and not backfill.renew_lease(
                    conn, lease.job_id, lease.owner, lease.lease_s
                ):
                    raise LeaseLost(
                        f"backfill job {lease.job_id}: another replica took its lease over; "
                        "this batch was not written"
                    )
            if len(res.vec_ids) == 0:
                return 0
            self._advance(int(res.vec_ids[0]), int(res.vec_ids[-1]))
            tag = route_label(info.version, route)
            kept = [e for e, k in zip(external_ids, keep.tolist(), strict=True) if k]
            entries = [(iid, eid, tag) for iid, eid in zip(res.item_ids, kept, strict=True)]
            self._apply(sidx, res.old_vec_ids, res.vec_ids, vecs[keep], entries)
            return len(res.item_ids)

    def time_write(
        self, item_ids: Sequence[int], vectors: np.ndarray, version: str, *, route: str = ROUTE_MODEL
    ) -> float:
        """Seconds the SQL side of :meth:`write_item_vectors` takes for these items (ascending ids), in a
        transaction that is rolled back: nothing is stored (a cost probe for reports; it holds the writer
        lock meanwhile, and the index side of a write is not timed)."""
        self._check_open()
        info = self._version(version)
        ids = np.asarray(item_ids, dtype=np.int64)
        if len(ids) == 0:
            return 0.0
        vecs = as_unit_vectors(vectors, info.embedding_dim, info.space, what="vector")
        t0 = time.perf_counter()
        with self.engine.connect() as conn:
            tx = conn.begin()
            try:
                store.write_item_vectors(
                    conn, item_ids=ids, vectors=vecs, version=info.version, space=info.space, route=route
                )
            finally:
                tx.rollback()
        return time.perf_counter() - t0

    def delete(self, external_ids: Iterable[str], *, missing_ok: bool = False) -> int:
        """Delete items (all their embeddings, every space) in one transaction; returns how many.

        Unknown ids raise :class:`ItemNotFound` and nothing is deleted, unless ``missing_ok``.
        """
        self._check_open()
        ids = check_external_ids(list(external_ids))
        if not ids:
            return 0
        with self._mutex:
            self._check_open()
            with self.engine.begin() as conn:
                n_deleted, removed = store.delete_items(conn, ids, missing_ok)
                marker = store.mark_change(conn) if n_deleted else None
            self._items -= n_deleted
            if marker is not None:
                self._advance(marker, marker)
            self._remove_vectors(removed)
            return n_deleted

    def _advance(self, first: int, last: int) -> None:
        """After this process committed vec_ids ``first..last`` (under the mutex): when nothing of another
        process lies between them and what was followed, they are followed too, so a lone process never
        reads its own writes back."""
        if first == self._followed + 1:
            self._followed = last

    # ------------------------------------------------------------------ replicas
    def follow(self) -> FollowReport | None:
        """Apply what other processes (replicas on the same database) committed since this one last looked:
        vectors they wrote are added to FAISS, vectors they replaced or deleted are dropped, spaces they
        made are opened. One cheap query when nothing changed (then None).

        Exact, like :func:`~index.reconcile.reconcile`: vec_ids are handed out in commit order, so the
        rows to add are those above the followed counter (own writes among them are skipped); losses
        (deletes, re-embeds) show as a count mismatch up to the counter, and only then are ids listed.
        """
        self._check_open()
        with self.engine.connect() as conn:
            if store.head(conn) == self._followed:
                return None
        t0 = time.perf_counter()
        with self._mutex:
            self._check_open()
            with self.engine.connect() as conn:
                head = store.head(conn)
                if head == self._followed:
                    return None
                new_spaces = sorted(set(catalog.space_dims(conn)) - set(self._spaces))
            if new_spaces:
                self._discover_spaces()  # opens (reconciles) them whole
            added = removed = 0
            with self.engine.connect() as conn:
                for sidx in list(self._spaces.values()):
                    if sidx.space in new_spaces:
                        continue
                    a, r = self._follow_space(conn, sidx, head)
                    added, removed = added + a, removed + r
                self._items = store.item_count(conn)
            self._followed = head
            self._generation += 1
        report = FollowReport(head, added, removed, new_spaces, time.perf_counter() - t0)
        log.debug("followed the database to %d: %s", head, report)
        return report

    def _follow_space(self, conn: Any, sidx: SpaceIndex, head: int) -> tuple[int, int]:
        """Bring ``sidx`` to the database's state up to vec_id ``head`` (under the mutex). (added, removed)."""
        known = sidx.entries
        ids: list[int] = []
        vecs: list[np.ndarray] = []
        entries: list[tuple[int, str, str]] = []
        for chunk in store.scan_space(conn, sidx.space, sidx.dim, above=self._followed):
            for k, vid in enumerate(chunk.vec_ids):
                if vid <= head and vid not in known:
                    ids.append(int(vid))
                    vecs.append(chunk.vectors[k])
                    entries.append((chunk.item_ids[k], chunk.external_ids[k], chunk.versions[k]))
        stale = np.empty(0, np.int64)
        if store.count_upto(conn, sidx.space, head) != sidx.live_count + len(ids):
            in_sql = store.vec_ids_upto(conn, sidx.space, head)
            local = np.fromiter(known.keys(), dtype=np.int64, count=len(known))
            stale = local[~np.isin(local, in_sql)]
            pending = np.asarray(ids, dtype=np.int64)
            missing = in_sql[~np.isin(in_sql, local) & ~np.isin(in_sql, pending)]
            for chunk in store.rows_by_vec_ids(conn, missing.tolist(), sidx.dim):
                for k, vid in enumerate(chunk.vec_ids):
                    ids.append(int(vid))
                    vecs.append(chunk.vectors[k])
                    entries.append((chunk.item_ids[k], chunk.external_ids[k], chunk.versions[k]))
        if ids or len(stale):
            self._apply(
                sidx,
                stale.tolist(),
                np.asarray(ids, dtype=np.int64) if ids else None,
                np.stack(vecs).astype(np.float32, copy=False) if ids else None,
                entries if ids else None,
            )
        return len(ids), len(stale)

    @property
    def followed(self) -> int:
        """The database's change counter up to which this process applied every commit (its own and, by
        :meth:`follow`, other processes')."""
        return self._followed

    def refresh_versions(self) -> None:
        """Re-read every version's row (status changes made by another process)."""
        self._check_open()
        with self.engine.connect() as conn:
            versions = {v.version: v for v in catalog.list_versions(conn)}
        with self._mutex:
            self._versions.update(versions)

    def _remove_vectors(self, removed: Iterable[tuple[str, int]]) -> None:
        """Drop committed deletions ``(space, vec_id)`` from the spaces' FAISS indexes (under the mutex)."""
        by_space: dict[str, list[int]] = defaultdict(list)
        for sp, vid in removed:
            by_space[sp].append(vid)
        for sp, vids in by_space.items():
            if sp in self._spaces:
                self._apply(self._spaces[sp], vids, None, None, None)

    def _apply(
        self,
        sidx: SpaceIndex,
        remove: Sequence[int],
        add_ids: np.ndarray | None,
        add_vectors: np.ndarray | None,
        add_entries: list[tuple[int, str, str]] | None,
    ) -> None:
        """Mutate FAISS after a commit. If that fails, the committed data stands: rebuild from SQL."""
        self._generation += 1  # (under the mutation mutex) cached filter results are stale now
        try:
            sidx.apply(np.asarray(remove, dtype=np.int64), add_ids, add_vectors, add_entries)
        except Exception:
            log.exception("space %r: FAISS mutation failed after commit; rebuilding from SQL", sidx.space)
            reconcile(self.engine, sidx, None)
        self._rebuild_if_needed(sidx)
        self._maybe_snapshot(sidx)

    def _rebuild_if_needed(self, sidx: SpaceIndex) -> None:
        reason = sidx.needs_rebuild()
        if not reason:
            return
        if self.config.background_builds:
            self._builder.start(sidx, reason)  # no-op while one runs
        else:
            log.info("space %r: rebuilding from SQL: %s", sidx.space, reason)
            reconcile(self.engine, sidx, None)

    def rebuild_index(self, space: str, reason: str = "asked for") -> bool:
        """Rebuild ``space``'s index from SQL (in the background with ``background_builds``; measuring its
        recall). False when a build of it is already running."""
        self._check_open()
        sidx = self._space_index(space)
        with self._mutex:
            if self.config.background_builds:
                return self._builder.start(sidx, reason)
            reconcile(self.engine, sidx, None)
            return True

    def wait_for_index_builds(self, timeout: float | None = None) -> bool:
        """Wait for background builds to be installed; True when none is running."""
        return self._builder.wait(timeout)

    def _maybe_snapshot(self, sidx: SpaceIndex) -> None:
        every = self.config.snapshot_every
        if every is not None and sidx.changes_since_snapshot >= every:
            sidx.save(self.index_dir)

    # ------------------------------------------------------------------ reads
    def search(
        self,
        space: str,
        vectors: np.ndarray,
        k: int,
        *,
        version: str | None = None,
        filter: MetadataFilter | Mapping[str, Any] | None = None,  # noqa: A002 - the API's word
    ) -> list[list[Hit]]:
        """Top-``k`` items of ``space`` for each query, best first (cosine score, the item's ``embedded_by``).

        ``vectors``: (n, d) or (d,) floats, L2-normalised here. ``version``, if given, is the model that
        embedded the queries: its space must be ``space`` (else :class:`SpaceMismatch`). Returns n lists
        of at most ``k`` hits (fewer when the space holds fewer items). Without a filter, never touches SQL.

        ``filter``: a :class:`~index.filters.MetadataFilter` or its JSON form (``{"label": 3, "color":
        {"in": ["red", "blue"]}}``; bad ones raise :class:`InvalidInput`). The matching vec_ids are read
        from SQL (one query) and FAISS searches only those (an ``IDSelector``), so an exact index returns
        ``min(k, matching items)`` hits. An approximate index answers a filter matching at most
        :data:`EXACT_FILTERED_MAX` vectors exactly from their stored vectors, a larger one through FAISS.
        """
        self._check_open()
        sidx = self._space_index(space)
        if version is not None:
            info = self._version(version)
            if info.space != space:
                raise SpaceMismatch(version, info.space, space)
        k = check_k(k)
        flt = MetadataFilter.parse(filter)
        queries = as_unit_vectors(vectors, sidx.dim, space, what="query")
        if flt is None:
            return sidx.search(queries, k)
        return self._search_filtered(sidx, queries, k, flt)

    def _search_filtered(
        self, sidx: SpaceIndex, queries: np.ndarray, k: int, flt: MetadataFilter
    ) -> list[list[Hit]]:
        """See :meth:`search`: FAISS over the allowed vec_ids; exact from SQL for small matching sets of an
        approximate index, and for any query an approximate index answered with fewer than k hits."""
        if len(queries) == 0:
            return []
        matching = self._matching(sidx, flt, rows=False)
        allowed = matching.vec_ids
        if len(allowed) == 0:
            return [[] for _ in range(len(queries))]
        if not sidx.exact and len(allowed) <= EXACT_FILTERED_MAX:
            entries, vectors = self._matching(sidx, flt, rows=True).rows  # type: ignore[misc]
            return _exact_hits(queries, k, entries, vectors)
        if matching.covers is None:  # once per matching set: does the filter let every live vector through?
            matching.covers = -1
            if len(allowed) >= sidx.live_count:
                live, at = sidx.live_ids()
                if np.isin(live, allowed).all():
                    matching.covers = at  # until the index changes, the filter excludes nothing
        hits = sidx.search(queries, k, allowed=allowed, allows_all_at=matching.covers)
        want = min(k, len(allowed))
        short = [i for i, row in enumerate(hits) if len(row) < want]
        if short and not sidx.exact:
            log.debug(
                "space %r: %d filtered queries short of %d hits: answered exactly",
                sidx.space,
                len(short),
                want,
            )
            entries, vectors = self._matching(sidx, flt, rows=True).rows  # type: ignore[misc]
            for i, row in zip(short, _exact_hits(queries[short], k, entries, vectors), strict=True):
                hits[i] = row
        return hits

    def _matching(self, sidx: SpaceIndex, flt: MetadataFilter, *, rows: bool) -> _Matching:
        """The vec_ids of ``sidx``'s space matching ``flt`` (and with ``rows``, their entries and vectors),
        from the cache when this object wrote nothing since and they are younger than
        :data:`FILTER_CACHE_TTL_S`, else from SQL (one query)."""
        key = (sidx.space, flt)
        generation, now = self._generation, time.monotonic()  # read before SQL: a later write invalidates
        with self._filter_lock:
            got = self._filter_cache.get(key)
            fresh = got is not None and got.generation == generation and now - got.at <= FILTER_CACHE_TTL_S
            if got is not None and fresh and (not rows or got.rows is not None):
                self._filter_cache.move_to_end(key)
                return got
        with self.engine.connect() as conn:
            if rows:
                vec_ids, entries, vectors = filters.matching_rows(conn, sidx.space, flt, sidx.dim)
                found = _Matching(generation, now, vec_ids, (entries, vectors))
            else:
                found = _Matching(generation, now, filters.matching_vec_ids(conn, sidx.space, flt), None)
        with self._filter_lock:
            self._filter_cache[key] = found
            self._filter_cache.move_to_end(key)
            total = sum(m.nbytes for m in self._filter_cache.values())
            while total > FILTER_CACHE_BYTES and len(self._filter_cache) > 1:
                _, dropped = self._filter_cache.popitem(last=False)
                total -= dropped.nbytes
        return found

    def scroll(self, after: str | None = None, limit: int = 100) -> list[store.ItemRecord]:
        """One page of items in external-id order (the database's): up to ``limit`` (1 to
        :data:`index.items.MAX_SCROLL`) items whose external id sorts after ``after`` (None: from the first).
        Pass the last id of a page as the next page's ``after``; a page shorter than ``limit`` is the last."""
        self._check_open()
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= item_sql.MAX_SCROLL:
            raise InvalidInput(f"limit must be an integer in 1-{item_sql.MAX_SCROLL}, not {limit!r}")
        if after is not None and (not isinstance(after, str) or len(after) > 4096):
            raise InvalidInput("after must be an external id (a str)")
        if after is not None:
            check_text(after, "after")
        with self.engine.connect() as conn:
            return item_sql.scroll(conn, after, limit)

    def delete_many(self, external_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Delete the items that exist among ``external_ids`` (one transaction); unknown ids are no error.
        Returns ``(deleted, missing)``, each in input order."""
        self._check_open()
        ids = check_external_ids(list(external_ids))
        if not ids:
            return [], []
        with self._mutex:
            self._check_open()
            with self.engine.begin() as conn:
                deleted, missing, removed = item_sql.delete_found(conn, ids)
                marker = store.mark_change(conn) if deleted else None
            self._items -= len(deleted)
            if marker is not None:
                self._advance(marker, marker)
            self._remove_vectors(removed)
            return deleted, missing

    def update_metadata(
        self, external_id: str, metadata: Mapping[str, Any] | None, *, merge: bool = True
    ) -> store.ItemRecord:
        """Change one item's metadata and return its stored record. ``merge=True``: keys whose value is None
        are removed, the others set; ``merge=False``: ``metadata`` replaces it. The result is validated like
        an ingest's (:class:`InvalidInput`, nothing changed); :class:`ItemNotFound` for an unknown id. Only
        SQL changes: vectors, FAISS and filters' next reads see the new metadata at once."""
        self._check_open()
        (eid,) = check_external_ids([external_id])
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidInput(f"metadata of {eid!r} must be an object, not {type(metadata).__name__}")
        with self._mutex:
            self._check_open()
            with self.engine.begin() as conn:
                record = item_sql.update_metadata(conn, eid, metadata, merge)
            self._generation += 1
            return record

    def get_items(self, external_ids: Iterable[str]) -> dict[str, store.ItemRecord]:
        """Stored records (metadata, source_uri, timestamps, embedded_by per space) of the ids that exist."""
        self._check_open()
        with self.engine.connect() as conn:
            return store.get_items(conn, list(external_ids))

    def get_metadata(self, external_ids: Iterable[str]) -> dict[str, Any]:
        """external_id -> metadata for the ids that exist (one SQL round trip per 500 ids)."""
        return {e: r.metadata for e, r in self.get_items(external_ids).items()}

    def get_embedding(self, external_id: str, space: str) -> tuple[np.ndarray, str]:
        """The stored unit vector (d,) float32 of an item in ``space`` and the version that made it."""
        self._check_open()
        sidx = self._space_index(space)
        with self.engine.connect() as conn:
            got = store.get_vector(conn, external_id, space, sidx.dim)
        if got is None:
            raise ItemNotFound([external_id], f" in space {space!r}")
        return got

    def count(self, space: str | None = None) -> int:
        """Items in the gallery (``space`` None) or items with an embedding in ``space`` (from SQL)."""
        self._check_open()
        if space is not None:
            self._space_index(space)
        with self.engine.connect() as conn:
            return store.item_count(conn) if space is None else store.space_count(conn, space)

    def live_counts(self, space: str) -> tuple[int, int]:
        """``(items, items with an embedding in space)`` from memory, O(1) whatever the gallery's size.

        Kept in step with this process's commits (and refreshed by :meth:`reconcile`); :meth:`count`
        asks SQL instead. For policy checks on hot paths, e.g. "may this model serve over the gallery".
        Read under the mutation mutex: a writer updates the item count at its commit and the index just
        after, so an unguarded read between the two saw counts that disagree (found by bench/soak.py: a
        hot swap refused as if the gallery were in another space while deletes ran).
        """
        self._check_open()
        with self._mutex:
            sidx = self._spaces.get(space)
            return self._items, (sidx.live_count if sidx is not None else 0)

    def counts_by_version(self) -> dict[str, int]:
        """Embeddings per version that made them (all spaces)."""
        self._check_open()
        with self.engine.connect() as conn:
            return store.counts_by(conn, "version")

    def counts_in_space(self, space: str) -> dict[str, dict[str, int]]:
        """Embeddings of ``space`` per version that made them and route: ``{version: {"model": n,
        "transform": m}}`` (routes without any are absent): which generations the gallery's items come from."""
        self._check_open()
        with self.engine.connect() as conn:
            return store.counts_by_version_route(conn, space)

    def counts_by_space(self) -> dict[str, int]:
        """Embeddings per space (spaces without any are absent)."""
        self._check_open()
        with self.engine.connect() as conn:
            return store.counts_by(conn, "space")

    def consistency(self, space: str) -> tuple[int, int]:
        """``(faiss_count, sql_count)`` of a space: live vectors in FAISS vs embedding rows in SQL."""
        self._check_open()
        sidx = self._space_index(space)
        with self._mutex:
            return sidx.live_count, self.count(space)

    def index_info(self, space: str) -> dict[str, Any]:
        """Diagnostics of a space's index: factory, built factory, ntotal, tombstones, staging."""
        sidx = self._space_index(space)
        return {
            "space": space,
            "dim": sidx.dim,
            "factory": sidx.factory,
            "built_factory": sidx.built_factory,
            "ntotal": sidx.ntotal,
            "live": sidx.live_count,
            "tombstones": sidx.tombstone_count,
            "removable": sidx.removable,
            "staging": sidx.staging,
            "changes_since_snapshot": sidx.changes_since_snapshot,
            "params": sidx.params,
            "building": sidx.build_progress,
            "last_build": sidx.last_build,
        }

    # ------------------------------------------------------------------ reads for backfill and checks
    def item_sources(self) -> list[tuple[int, str, str | None]]:
        """``(item_id, external_id, source_uri)`` of every item, by item id (one SQL pass)."""
        self._check_open()
        with self.engine.connect() as conn:
            return backfill.sources(conn)

    def items_by_id(self, item_ids: Sequence[int]) -> dict[int, tuple[str, str | None, Any]]:
        """item id -> ``(external_id, source_uri, metadata)`` for the ids that exist."""
        self._check_open()
        with self.engine.connect() as conn:
            return backfill.items_by_id(conn, item_ids)

    def embeddings_of(self, item_ids: Sequence[int], space: str) -> tuple[np.ndarray, list[str], np.ndarray]:
        """Stored embeddings of items in ``space``: ``(item_ids (m,), versions, vectors (m, d))``, input order."""
        self._check_open()
        sidx = self._space_index(space)
        with self.engine.connect() as conn:
            return backfill.vectors_of_items(conn, item_ids, space, sidx.dim)

    def space_embeddings(self, space: str) -> tuple[np.ndarray, list[str], np.ndarray]:
        """Every stored embedding of ``space`` (one SQL pass): ``(item_ids (n,) int64, versions, vectors (n, d))``
        (the version that embedded each, whatever the route)."""
        self._check_open()
        sidx = self._space_index(space)
        ids: list[np.ndarray] = []
        versions: list[str] = []
        vecs: list[np.ndarray] = []
        with self.engine.connect() as conn:
            for chunk in store.scan_space(conn, space, sidx.dim):
                ids.append(np.asarray(chunk.item_ids, dtype=np.int64))
                versions += [split_label(v)[0] for v in chunk.versions]
                vecs.append(chunk.vectors)
        if not ids:
            return np.empty(0, np.int64), [], np.empty((0, sidx.dim), np.float32)
        return np.concatenate(ids), versions, np.concatenate(vecs)


@dataclass(frozen=True)
class FollowReport:
    """What one :meth:`Gallery.follow` applied."""

    head: int  # the database's change counter it followed up to
    added: int  # vectors added (written by other processes)
    removed: int  # vectors dropped (deleted or replaced by other processes)
    new_spaces: list[str]  # spaces opened
    seconds: float


class _Matching:
    """A filter's matching vec_ids (sorted int64) and, when read, ``rows``: their (item_id, external_id,
    version) entries and vectors; ``generation`` and ``at`` say when they were read."""

    __slots__ = ("at", "covers", "generation", "nbytes", "rows", "vec_ids")

    def __init__(
        self,
        generation: int,
        at: float,
        vec_ids: np.ndarray,
        rows: tuple[list[tuple[int, str, str]], np.ndarray] | None,
    ) -> None:
        self.generation, self.at, self.vec_ids, self.rows = generation, at, vec_ids, rows
        # SpaceIndex.mutations at which every live vector of the space matched (-1: not so; None: unknown)
        self.covers: int | None = None
        self.nbytes = int(vec_ids.nbytes) + (0 if rows is None else int(rows[1].nbytes) + 120 * len(rows[0]))


def _exact_hits(
    queries: np.ndarray, k: int, entries: Sequence[tuple[int, str, str]], vectors: np.ndarray
) -> list[list[Hit]]:
    """Exact top-``k`` of ``queries`` (n, d) over ``vectors`` (m, d) whose rows are ``entries`` (item_id,
    external_id, version), best first."""
    scores = queries @ vectors.T  # (n, m) cosine similarities
    kk = min(k, len(entries))
    if kk < scores.shape[1]:
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    else:
        top = np.broadcast_to(np.arange(scores.shape[1]), (len(scores), scores.shape[1]))
    out = []
    for row, idx in zip(scores, top, strict=True):
        order = idx[np.argsort(-row[idx], kind="stable")]
        out.append([Hit.of(entries[j], float(row[j])) for j in order.tolist()])
    return out
