"""Per-request deadlines: work that cannot be done within ``GRACEFUL_REQUEST_TIMEOUT_S`` answers 503 or 504
with a message instead of hanging.

503 (:class:`~service.errors.Overloaded`) means the work never started, so nothing was done and a retry is
safe; 504 (:class:`~service.errors.RequestTimeout`) means it started and could not be interrupted (a model
forward, a transaction): the message says what the client should assume.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from service.errors import Overloaded, RequestTimeout

R = TypeVar("R")


def deadline_in(seconds: float) -> float:
    """The ``time.monotonic()`` instant ``seconds`` from now."""
    return time.monotonic() + seconds


async def result_within(future: Future[R], deadline: float, what: str, *, outcome_if_late: str) -> R:
    """Await a job's result until ``deadline`` (a ``time.monotonic()`` instant).

    Past it, a job that has not started is cancelled, so nothing was done: :class:`Overloaded` (503). A job
    already running cannot be interrupted (a model forward, a committed transaction):
    :class:`RequestTimeout` (504), whose message says ``outcome_if_late`` (what the client should assume).
    """
    afut = asyncio.wrap_future(future)
    afut.add_done_callback(_consume)  # a late exception must not be logged as "never retrieved"
    try:
        return await asyncio.wait_for(asyncio.shield(afut), max(deadline - time.monotonic(), 0.0))
    except TimeoutError:
        if future.cancel():
            raise Overloaded(
                f"{what} could not be started before its deadline (GRACEFUL_REQUEST_TIMEOUT_S): "
                "the server is overloaded; nothing was done, retry later"
            ) from None
        raise RequestTimeout(
            f"{what} did not finish before its deadline (GRACEFUL_REQUEST_TIMEOUT_S); {outcome_if_late}"
        ) from None


def _consume(f: asyncio.Future[Any]) -> None:
    if not f.cancelled():
        f.exception()


async def run_within(fn: Callable[..., R], *args: Any, deadline: float, what: str) -> R:
    """Run a read-only ``fn(*args)`` in the default thread pool; past ``deadline``, answer 504 and let the
    thread finish on its own (it changes nothing)."""
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(None, fn, *args)
    fut.add_done_callback(_consume)
    try:
        return await asyncio.wait_for(asyncio.shield(fut), max(deadline - time.monotonic(), 0.0))
    except TimeoutError:
        raise RequestTimeout(
            f"{what} did not finish before its deadline (GRACEFUL_REQUEST_TIMEOUT_S)"
        ) from None
