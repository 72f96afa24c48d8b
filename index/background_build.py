"""Building a space's approximate index (HNSW, IVF...) off to the side, then swapping it in.

While a build runs, the space keeps serving from its current index (the exact ``Flat`` staging index at
first, the previous build on a rebuild) and writes keep landing: they are applied as usual and also
recorded in the space's delta (:meth:`SpaceIndex.begin_delta`), which :meth:`SpaceIndex.install` replays
onto the new index before swapping it in. The build reads SQL only, never the live index, so whatever a
concurrent reconcile does to the live index, the result equals the database.

Every build measures what it costs in quality: recall@k against exact search on a sample of stored vectors
used as queries (the query itself left out of both answers), computed while the vectors stream past, so no
second copy of the gallery is held. The report (factory, size, seconds, recall) is kept on the space, shown
by :meth:`Gallery.index_info`, and written beside the snapshot (``<space>.build.json``) so a restart that
loads the snapshot still knows it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import Engine

from . import atomic, store
from .config import IndexConfig
from .reconcile import TRAIN_FACTOR, TRAIN_MAX
from .space_index import Entry, SpaceIndex, make_faiss_index

log = logging.getLogger(__name__)

RECALL_POOL = 50_000  # recall queries are drawn from this many stored vectors (the first, by vec_id)


@dataclass(frozen=True)
class BuildReport:
    """One finished build. ``recall`` is recall@``k`` vs exact search on ``sample`` stored vectors (None when
    the space held too few to sample)."""

    space: str
    factory: str
    params: str | None
    reason: str
    vectors: int
    seconds: float
    replayed: int  # writes that landed during the build and were replayed onto it
    recall: float | None
    k: int
    sample: int
    finished_at: float


def report_path(index_dir: Path, space: str) -> Path:
    return index_dir / f"{space}.build.json"


def write_report(index_dir: Path, report: BuildReport) -> None:
    atomic.write_bytes(report_path(index_dir, report.space), json.dumps(asdict(report), indent=1).encode())


def read_report(index_dir: Path, space: str, factory: str) -> dict | None:
    """The build report beside a space's snapshot, if it is for ``factory`` (else None)."""
    try:
        data = json.loads(report_path(index_dir, space).read_text())
    except (OSError, ValueError):
        return None
    return (
        data
        if isinstance(data, dict) and data.get("factory") == factory and data.get("space") == space
        else None
    )


class _ExactTopK:
    """Running exact top-``k`` (inner product) of fixed queries over vectors streamed in chunks."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.q = queries
        self.k = k
        self.scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.ids = np.full((len(queries), k), -1, dtype=np.int64)

    def update(self, ids: np.ndarray, vectors: np.ndarray, step: int = 8192) -> None:
        for s in range(0, len(ids), step):
            sims = self.q @ vectors[s : s + step].T  # (m, c)
            cand_s = np.concatenate([self.scores, sims], axis=1)
            cand_i = np.concatenate([self.ids, np.broadcast_to(ids[s : s + step], sims.shape)], axis=1)
            top = np.argpartition(-cand_s, self.k - 1, axis=1)[:, : self.k]
            self.scores = np.take_along_axis(cand_s, top, axis=1)
            self.ids = np.take_along_axis(cand_i, top, axis=1)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, self_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k, each list without the query's own id.

    ``approx_ids`` (m, >= k+1) best first; ``exact_ids`` (m, k+1) in any order; ``self_ids`` (m,).
    """
    hits = 0.0
    for a, e, me in zip(approx_ids.tolist(), exact_ids.tolist(), self_ids.tolist(), strict=True):
        a = [v for v in a if v != me and v >= 0][:k]
        e = set(v for v in e if v != me and v >= 0)
        hits += len(e.intersection(a)) / max(min(k, len(e)), 1)
    return hits / max(len(self_ids), 1)


class IndexBuilder:
    """Runs at most one background build per space, in a daemon thread. ``lock`` is the gallery's mutation
    mutex: held only to start the delta and to install (replay + swap), never while reading or building."""

    def __init__(
        self,
        engine: Engine,
        index_dir: Path,
        lock: threading.RLock,
        config: IndexConfig | None = None,
        *,
        recall_k: int = 10,
        on_installed: Callable[[SpaceIndex], None] | None = None,
    ) -> None:
        """``config``: the gallery's index options (``recall_sample`` is used here); None: the defaults."""
        self.engine, self.index_dir, self.lock = engine, index_dir, lock
        recall_sample = (config if config is not None else IndexConfig()).recall_sample
        self.recall_sample, self.recall_k = int(recall_sample), int(recall_k)
        self.on_installed = on_installed
        self._threads: dict[str, threading.Thread] = {}
        self._cancel = threading.Event()

    def running(self, space: str) -> bool:
        t = self._threads.get(space)
        return t is not None and t.is_alive()

    def start(self, sidx: SpaceIndex, reason: str) -> bool:
        """Start a build of ``sidx`` unless one is running. Call with the gallery's mutex held."""
        if self.running(sidx.space) or self._cancel.is_set():
            return False
        sidx.begin_delta()  # under the mutex: every commit from here on is read by the build or recorded
        sidx.build_progress = {"reason": reason, "started_at": time.time(), "done": 0, "total": None}
        t = threading.Thread(
            target=self._run, args=(sidx, reason), name=f"index-build-{sidx.space}", daemon=True
        )
        self._threads[sidx.space] = t
        log.info("space %r: background build of %s started: %s", sidx.space, sidx.factory, reason)
        t.start()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for running builds; True when none is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in list(self._threads.values()):
            t.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        return not any(t.is_alive() for t in self._threads.values())

    def close(self, timeout: float = 60.0) -> None:
        """Cancel running builds (they stop at their next chunk) and wait for them."""
        self._cancel.set()
        self.wait(timeout)

    def _run(self, sidx: SpaceIndex, reason: str) -> None:
        t0 = time.perf_counter()
        try:
            built = self._build(sidx)
            if built is None:  # cancelled
                sidx.end_delta()
                return
            index, entries, recall, sample = built
            with self.lock:
                if self._cancel.is_set():
                    sidx.end_delta()
                    return
                replayed = sidx.install(index, entries)
                report = BuildReport(
                    space=sidx.space,
                    factory=sidx.factory,
                    params=sidx.params,
                    reason=reason,
                    vectors=len(entries),
                    seconds=round(time.perf_counter() - t0, 3),
                    replayed=replayed,
                    recall=None if recall is None else round(recall, 4),
                    k=self.recall_k,
                    sample=sample,
                    finished_at=time.time(),
                )
                sidx.last_build = asdict(report)
                try:
                    write_report(self.index_dir, report)
                except OSError as e:
                    log.warning("space %r: could not write the build report: %s", sidx.space, e)
                if self.on_installed is not None:
                    self.on_installed(sidx)
            log.info("space %r: background build installed: %s", sidx.space, report)
        except Exception:
            log.exception("space %r: background build failed; the current index keeps serving", sidx.space)
            sidx.end_delta()
        finally:
            sidx.build_progress = None

    def _build(
        self, sidx: SpaceIndex
    ) -> tuple[faiss.IndexIDMap2, dict[int, Entry], float | None, int] | None:
        progress = sidx.build_progress or {}
        with self.engine.connect() as conn:
            total = store.space_count(conn, sidx.space)
            progress["total"] = total
            index = make_faiss_index(sidx.factory, sidx.dim, sidx.params)
            pool = store.training_sample(
                conn,
                sidx.space,
                min(max(TRAIN_FACTOR * sidx.min_train, RECALL_POOL), TRAIN_MAX, total),
                sidx.dim,
            )
            if sidx.trainable:
                t = time.perf_counter()
                index.train(np.ascontiguousarray(pool[: min(TRAIN_FACTOR * sidx.min_train, TRAIN_MAX)]))
                log.info(
                    "space %r: trained %s on %d vectors in %.1fs",
                    sidx.space,
                    sidx.factory,
                    min(len(pool), TRAIN_FACTOR * sidx.min_train),
                    time.perf_counter() - t,
                )
            rng = np.random.default_rng(0)
            m = min(self.recall_sample, len(pool))
            queries = pool[rng.choice(len(pool), size=m, replace=False)] if m > self.recall_k else pool[:0]
            exact = _ExactTopK(queries, self.recall_k + 1) if len(queries) else None
            query_ids = np.full(len(queries), -1, dtype=np.int64)
            entries: dict[int, Entry] = {}
            for chunk in store.scan_space(conn, sidx.space, sidx.dim):
                if self._cancel.is_set():
                    return None
                if len(chunk.vector_ids):
                    index.add_with_ids(chunk.vectors, chunk.vector_ids)
                    if exact is not None:
                        exact.update(chunk.vector_ids, chunk.vectors)
                entries.update(chunk.entries())
                progress["done"] = len(entries)
        recall = None
        if exact is not None:
            # the queries are stored vectors: each one's own id is its exact best match (score 1)
            query_ids = exact.ids[np.arange(len(queries)), np.argmax(exact.scores, axis=1)]
            _, approx = index.search(np.ascontiguousarray(queries), self.recall_k + 1)
            recall = recall_at_k(approx, exact.ids, query_ids, self.recall_k)
        return index, entries, recall, len(queries)
