"""Reading JSON or multipart bodies by content type, with errors that name the problem."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service.errors import BadRequest

M = TypeVar("M", bound=BaseModel)


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def validation_message(errors: Sequence[Any]) -> str:
    """One line naming each problem of a pydantic error list: ``invalid request: items.0.external_id: ...``."""
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


async def read_json(request: Request, model: type[M]) -> M:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise BadRequest(f"unsupported content type {ctype!r}: send application/json or multipart/form-data")
    raw = await request.body()
    if not raw:
        raise BadRequest("empty request body: expected a JSON object")
    try:
        data: Any = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON: {e}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise BadRequest(validation_message(e.errors())) from None


async def read_form(request: Request) -> tuple[list[tuple[str, bytes]], dict[str, list[str]]]:
    """(files as (filename, bytes), other fields as lists of strings) of a multipart body."""
    try:
        form = await request.form(max_files=100_000, max_fields=100_000)
    except Exception as e:  # starlette raises several types for broken multipart bodies
        raise BadRequest(f"malformed multipart body: {e}") from None
    files: list[tuple[str, bytes]] = []
    fields: dict[str, list[str]] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.append((value.filename or key, await value.read()))
        else:
            fields.setdefault(key, []).append(str(value))
    return files, fields
