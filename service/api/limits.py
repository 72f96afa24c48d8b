"""Bounds on request bodies, enforced while reading: their size (a lying or absent Content-Length does not
help) and the time they take to arrive (a client trickling its body holds a connection no longer than that)."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def _reject(self, send: Send, status: int = 413, detail: str | None = None) -> None:
        body = json.dumps(
            {"detail": detail or f"request body exceeds the limit of {self.max_bytes} bytes"}
        ).encode()
        # the rest of the body may still be on its way: close rather than read (and drop) it all
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(send)
                    return
        seen = 0
        started = False
        complete = False
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s

        async def _receive() -> Message:
            nonlocal seen, complete
            if complete or deadline is None:  # after the body: waiting for a disconnect is not bounded here
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
                except TimeoutError:
                    raise BodyTooSlow() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
                complete = not message.get("more_body", False)
            return message

        async def _send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, _receive, _send)
        except BodyTooLarge:
            if not started:
                await self._reject(send)
        except BodyTooSlow:
            if not started:
                await self._reject(send, 408, f"the request body did not arrive within {self.timeout_s:g} s")
