"""schemathesis against an in-process server: a ``requests.Session`` whose every request is delivered to a
running :class:`~starlette.testclient.TestClient`.

schemathesis sends its cases with ``requests``. Its own ASGI transport would start a second lifespan (a second
gallery over the same data dir) on its own event loop; this session instead hands each prepared request, as
``requests`` encoded it for the wire, to the TestClient whose lifespan is already running, and turns the
answer back into a ``requests.Response``.
"""

from __future__ import annotations

import io

import requests
import requests.adapters
import urllib3


class _Original:
    """What ``requests`` reads cookies from (``raw._original_response.msg.get_all``)."""

    def __init__(self, headers: list[tuple[str, str]]) -> None:
        self.msg = self
        self._headers = headers
        self.closed = False

    def get_all(self, name: str, default=None):
        found = [v for k, v in self._headers if k.lower() == name.lower()]
        return found or default

    def isclosed(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class _TestClientAdapter(requests.adapters.HTTPAdapter):
    def __init__(self, client) -> None:
        super().__init__()
        self.client = client

    def send(self, request: requests.PreparedRequest, *args, **kwargs) -> requests.Response:  # noqa: ARG002
        body = request.body
        if isinstance(body, str):
            body = body.encode("utf-8")
        r = self.client.request(
            request.method, request.url, headers=dict(request.headers), content=body or b""
        )
        headers = list(r.headers.multi_items())
        raw = urllib3.HTTPResponse(
            body=io.BytesIO(r.content),
            headers=headers,
            status=r.status_code,
            reason=r.reason_phrase,
            version=11,
            preload_content=False,
            decode_content=False,
            original_response=_Original(headers),
            request_method=request.method,
        )
        return self.build_response(request, raw)


class TestClientSession(requests.Session):
    """``case.call(base_url=server.url, session=TestClientSession(server.client), ...)``."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self, client) -> None:
        super().__init__()
        adapter = _TestClientAdapter(client)
        self.mount("http://", adapter)
        self.mount("https://", adapter)
