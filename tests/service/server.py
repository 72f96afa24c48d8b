"""A real graceful server in a child process on 127.0.0.1, with an HTTP client, for end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import httpx

from service.console.local_server import LocalServer


class Server(LocalServer):
    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        super().__init__(env, log_path, port)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def start(self, timeout: float = 120.0) -> Server:
        super().start(timeout)
        return self

    def close(self) -> None:
        self.kill()
        self.client.close()
