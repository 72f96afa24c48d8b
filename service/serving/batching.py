"""Dynamic micro-batching: concurrent requests are grouped into one batch run by one worker thread.

A request submits one *job* (a key and a payload) and gets a :class:`concurrent.futures.Future`. The worker
takes the first waiting job, then keeps collecting until the batch holds ``max_size`` jobs or ``max_wait_s``
has passed, and runs ``run_batch(key, payloads)`` once per key present (jobs of one key are one group, in
arrival order). The key is what a batch must share: for search, the :class:`~service.models.registry.ActiveModel`
object the request captured when it started, so a hot swap never mixes models inside one forward and every
answer names the model that embedded its query.

Waiting only pays when more requests are on their way, so the worker waits only while some request has
:meth:`announce`-d itself (entered the route, body still being read) and not yet submitted. A lone request
at concurrency 1 is run at once, without the wait; at concurrency 16 the batch fills while the event loop
parses the others. Jobs that were cancelled while queued (their request timed out) are skipped.

``max_queue`` bounds the jobs waiting: past it :meth:`submit` raises :class:`~service.errors.Overloaded`
(answered 503) instead of letting latency grow without bound.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from service.errors import Overloaded

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")

# run_batch(key, payloads) -> one result or exception per payload, in order
BatchFn = Callable[[Any, Sequence[P]], Sequence["R | BaseException"]]


@dataclass
class _Job(Generic[P, R]):
    key: Hashable
    payload: P
    size: int = 1
    deadline: float | None = None  # time.monotonic() instant past which the job is not started
    future: Future[R] = field(default_factory=Future)


@dataclass(frozen=True)
class BatchBounds:
    """How a micro-batcher groups work: most jobs (or items) per batch, longest wait for more, most queued;
    ``on_start`` runs once in the worker thread (per-thread library settings)."""

    max_size: int
    max_wait_s: float
    max_queue: int
    on_start: Callable[[], None] | None = None


class MicroBatcher(Generic[P, R]):
    """Groups submitted jobs into batches (at most ``max_size`` jobs, waiting at most ``max_wait_s``).

    With ``size_of`` a batch is bounded by the summed sizes instead (e.g. images per ingest request); a job
    larger than ``max_size`` runs alone. Thread-safe; :meth:`submit` never blocks. ``on_start`` runs once in the worker thread (e.g. to set
    per-thread FAISS threads); ``on_batch(n)`` after each batch (metrics).
    """

    def __init__(
        self,
        name: str,
        run_batch: BatchFn,
        *,
        max_size: int,
        max_wait_s: float,
        max_queue: int,
        on_start: Callable[[], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
        size_of: Callable[[P], int] | None = None,
    ) -> None:
        if max_size < 1 or max_wait_s < 0 or max_queue < 1:
            raise ValueError(
                f"bad batch bounds: max_size={max_size}, max_wait_s={max_wait_s}, max_queue={max_queue}"
            )
        self.name = name
        self.run_batch = run_batch
        self.max_size, self.max_wait_s, self.max_queue = int(max_size), float(max_wait_s), int(max_queue)
        self.on_start, self.on_batch = on_start, on_batch
        self.size_of = size_of
        self._queue: deque[_Job[P, R]] = deque()
        self._queued_size = 0  # sum of size_of over the queue (jobs when size_of is None)
        self._cond = threading.Condition(threading.Lock())
        self._arriving = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> MicroBatcher[P, R]:
        self._thread = threading.Thread(target=self._worker, name=f"batch-{self.name}", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; the worker finishes what is queued, then exits."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ submitting
    @contextmanager
    def announce(self) -> Iterator[None]:
        """Around a request from its arrival to its :meth:`submit`: tells the worker one more is coming."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    def submit(self, key: Hashable, payload: P, deadline: float | None = None) -> Future[R]:
        """Queue a job; ``deadline`` (a ``time.monotonic()`` instant): a job not started by then never runs
        and gets :class:`Overloaded` (so is one whose deadline has already passed)."""
        if deadline is not None and time.monotonic() >= deadline:
            raise Overloaded(
                f"the {self.name} request reached its deadline (GRACEFUL_REQUEST_TIMEOUT_S) before "
                "it could be started: nothing was done, retry later"
            )
        job: _Job[P, R] = _Job(key, payload, self.size_of(payload) if self.size_of else 1, deadline)
        with self._cond:
            if self._closed:
                raise Overloaded(f"the {self.name} queue is shut down: the server is stopping")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(
                    f"{len(self._queue)} {self.name} requests are already waiting (limit "
                    f"{self.max_queue}): the server is overloaded, retry later"
                )
            self._queue.append(job)
            self._queued_size += job.size
            self._cond.notify_all()
        return job.future

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ the worker
    def _collect(self) -> list[_Job[P, R]] | None:
        """The next batch (None once closed and drained)."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait_s
            while self._queued_size < self.max_size and self._arriving > 0 and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = [self._queue.popleft()]
            total = batch[0].size
            while self._queue and total + self._queue[0].size <= self.max_size:
                total += self._queue[0].size
                batch.append(self._queue.popleft())
            self._queued_size -= total
            return batch

    def _worker(self) -> None:
        if self.on_start is not None:
            self.on_start()
        while True:
            batch = self._collect()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for j in batch:
                if not j.future.set_running_or_notify_cancel():
                    continue  # its request gave up (deadline): it was answered 503 already
                if j.deadline is not None and now >= j.deadline:
                    j.future.set_exception(
                        Overloaded(
                            f"the {self.name} request waited past its deadline (GRACEFUL_REQUEST_TIMEOUT_S) before it "
                            "could be started: the server is overloaded; nothing was done, retry later"
                        )
                    )
                    continue
                live.append(j)
            if not live:
                continue
            groups: dict[Hashable, tuple[Any, list[_Job[P, R]]]] = {}
            for j in live:
                groups.setdefault(_ident(j.key), (j.key, []))[1].append(j)
            for key, jobs in groups.values():
                self._run_group(key, jobs)
            if self.on_batch is not None:
                try:
                    self.on_batch(len(live))
                except Exception:  # metrics must never stop the worker
                    log.exception("%s: on_batch failed", self.name)

    def _run_group(self, key: Any, jobs: list[_Job[P, R]]) -> None:
        try:
            results = self.run_batch(key, [j.payload for j in jobs])
            if len(results) != len(jobs):
                raise RuntimeError(f"{self.name} batch returned {len(results)} results for {len(jobs)} jobs")
        except Exception as e:  # the whole group failed: every request in it gets the error
            results = [e] * len(jobs)
        for j, r in zip(jobs, results, strict=True):
            if isinstance(r, BaseException):
                j.future.set_exception(r)
            else:
                j.future.set_result(r)


def _ident(key: Any) -> Hashable:
    """What groups jobs: plain values by value, any other object by identity (so two ActiveModel objects never
    share a group, even if equal field by field), tuples element by element. The jobs hold their keys while
    grouped, so no id() is reused meanwhile."""
    if isinstance(key, tuple):
        return tuple(_ident(k) for k in key)
    if key is None or isinstance(key, str | int | float | bool):
        return key
    return ("object", id(key))
