"""Servers for the service tests, both built from the same ``GRACEFUL_*`` settings dict.

- :class:`InProcessServer`: ``TestClient(create_app(settings))`` with the app's real lifespan, so the gallery
  is opened, the model loaded and the parts stopped exactly as under uvicorn, without a socket or a process.
  The default for API tests.
- :class:`RealServer`: ``graceful serve`` (uvicorn) in a child process on 127.0.0.1. Only for what needs a
  real process or socket: SIGKILL, tools that speak real HTTP to ``server.url``.

Both have ``start()`` (returns the server), ``client`` (an httpx-compatible client: ``.get/.post/.delete/
.patch`` with ``json=``, ``files=``, ``data=``, ``headers=``, ``content=``), ``connect()`` (a client for one
more thread, as a context manager), ``stop()`` (graceful; 0 when clean), ``close()`` and ``url``.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from service.console.local_server import LocalServer

log = logging.getLogger(__name__)


def settings_from_env(env: dict[str, str]) -> Any:
    """The :class:`~service.settings.Settings` a ``graceful serve`` started with ``env`` would read: the
    given ``GRACEFUL_*`` values, anything else from this process's environment (as a child would inherit)."""
    from service.settings import Settings

    prefix = "GRACEFUL_"
    return Settings(**{k.removeprefix(prefix).lower(): v for k, v in env.items() if k.startswith(prefix)})


class InProcessServer:
    """The app in this process, its lifespan entered in ``start()`` and exited in ``stop()``. Server errors
    answer 500 (as under uvicorn) rather than raising in the test, so a thread counting failures sees them."""

    url = "http://testserver"

    def __init__(self, env: dict[str, str]) -> None:
        self.env = dict(env)
        self.settings: Any = None
        self.app: Any = None
        self._client: TestClient | None = None
        self._running = False
        self.stop_error: BaseException | None = None

    @property
    def client(self) -> TestClient:
        if self._client is None:
            raise RuntimeError("start() the server before using its client")
        return self._client

    def start(self, timeout: float = 120.0) -> InProcessServer:  # noqa: ARG002 - the same call as RealServer's
        from service.app import create_app

        if self._running:
            raise RuntimeError("this server is already running")
        self.settings = settings_from_env(self.env)
        self.app = create_app(self.settings)
        self._client = TestClient(self.app, base_url=self.url, raise_server_exceptions=False)
        self._client.__enter__()  # runs the lifespan's start-up: gallery, registry, model, batchers, backfill
        self._running = True
        return self

    @contextlib.contextmanager
    def connect(self) -> Iterator[TestClient]:
        """A client for another thread: the TestClient is safe to share (each call goes through one portal)."""
        yield self.client

    def stop(self, timeout: float = 30.0) -> int:  # noqa: ARG002 - the same call as RealServer's
        """Run the lifespan's shutdown (queued requests finish, backfill commits, snapshots are written).
        0 when clean; 1 when the shutdown raised (the exception is logged and kept in ``stop_error``)."""
        if not self._running:
            return 0
        self._running = False
        try:
            self.client.__exit__(None, None, None)
        except BaseException as e:  # noqa: BLE001 - reported as a non-zero status, like a failed process
            self.stop_error = e
            log.error("the in-process server did not stop cleanly:\n%s", traceback.format_exc())
            return 1
        return 0

    def close(self) -> None:
        self.stop()


class RealServer(LocalServer):
    """``graceful serve`` in a child process on 127.0.0.1, with an httpx client; ``kill()`` is SIGKILL."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        super().__init__(env, log_path, port)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def start(self, timeout: float = 120.0) -> RealServer:
        super().start(timeout)
        return self

    @contextlib.contextmanager
    def connect(self) -> Iterator[httpx.Client]:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            yield c

    def close(self) -> None:
        self.kill()
        self.client.close()
