"""What bounds a connection to `graceful serve`, beyond what uvicorn's options give.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, answers 503 past
``limit_concurrency`` open connections or tasks, and bounds one h11 event's size; but a connection that opens
and never sends its request's headers (or sends them a byte at a time) is held forever: no uvicorn option
(0.3x to 0.5x) times out reading headers. :func:`header_deadline` wraps uvicorn's HTTP protocol class so that
a request's headers must arrive within ``header_timeout_s`` of the connection opening, or of the first byte
after the previous response; otherwise the connection is closed. Once the headers are in, the request is the
app's: :class:`service.api.limits.BodyLimitMiddleware` bounds the time its body may take.

So, per connection: headers within ``GRACEFUL_HTTP_HEADER_TIMEOUT_S``, the body within
``GRACEFUL_HTTP_BODY_TIMEOUT_S`` (408), an answer within ``GRACEFUL_REQUEST_TIMEOUT_S`` (503/504), idle
keep-alive for ``GRACEFUL_HTTP_TIMEOUT_KEEP_ALIVE_S``; and ``GRACEFUL_HTTP_LIMIT_CONCURRENCY`` connections or
requests in flight at most before new requests get 503.
"""

from __future__ import annotations

import asyncio
from typing import Any


def header_deadline(base: type[asyncio.Protocol], header_timeout_s: float) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol ``base`` (h11 or httptools: both keep the request in flight as
    ``self.cycle``) that closes connections whose request headers do not arrive within ``header_timeout_s``."""

    class HeaderDeadline(base):  # type: ignore[valid-type, misc]
        _header_timer: asyncio.TimerHandle | None = None

        def _in_request(self) -> bool:
            cycle: Any = getattr(self, "cycle", None)
            return cycle is not None and not cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self._in_request():  # the headers came; the body and the answer have their own bounds
                return
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()  # a connection that never sends a byte is held no longer than one that stalls

        def data_received(self, data: bytes) -> None:
            if not self._in_request():
                self._arm()  # from the first byte of a request (after an idle keep-alive, say)
            super().data_received(data)
            if self._in_request():
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    HeaderDeadline.__name__ = HeaderDeadline.__qualname__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadline
