"""API-key check for mutating endpoints (``X-API-Key``), when a key is configured."""

from __future__ import annotations

import secrets

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader

from service.api.deps import get_parts

_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="required when GRACEFUL_API_KEY is set"
)


def require_api_key(request: Request, key: str | None = Depends(_header)) -> None:
    expected = get_parts(request).settings.api_key
    if expected is None:
        return
    if key is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing X-API-Key header: this endpoint needs the API key"
        )
    if not secrets.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid API key")


WRITE = [Depends(require_api_key)]
