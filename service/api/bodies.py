"""Reading JSON or multipart bodies by content type, with errors that name the problem."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service.api.limits import BodyTooLarge, BodyTooSlow
from service.errors import BadRequest, TooLarge

M = TypeVar("M", bound=BaseModel)

# JSON nested deeper than this is refused before it is parsed: the body adds a few levels (items, an item)
# to the metadata a client means; Python's parser would raise RecursionError near 1000 levels anyway.
MAX_JSON_DEPTH = 64
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string, escapes included
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_DEPTH_CHUNK = 1 << 20


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


def nested_deeper_than(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``raw``'s arrays and objects nest deeper than ``limit`` (brackets inside strings not counted).

    Cheap for what a client sends: a body with at most ``limit`` opening brackets is not scanned; otherwise
    strings are cut out and the brackets counted in C (re, bytes.translate, numpy), never a Python loop per
    byte."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    brackets = np.frombuffer(_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS), dtype=np.uint8)
    depth = 0
    for start in range(0, len(brackets), _DEPTH_CHUNK):
        chunk = brackets[start : start + _DEPTH_CHUNK]
        level = np.cumsum(np.where((chunk == ord("[")) | (chunk == ord("{")), 1, -1), dtype=np.int64) + depth
        if int(level.max()) > limit:
            return True
        depth = int(level[-1])
    return False


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string (or key) of ``value`` holding a lone UTF-16 surrogate, if any."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            where = f"{path}.{k}" if path else str(k)
            found = _lone_surrogate(k, where) or _lone_surrogate(v, where)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _lone_surrogate(v, f"{path}.{i}" if path else str(i))
            if found:
                return found
    return None


def parse_json(raw: bytes | str, what: str = "JSON body") -> Any:
    """``raw`` parsed, or :class:`BadRequest` naming the problem: malformed, nested deeper than
    :data:`MAX_JSON_DEPTH`, or holding a lone surrogate escape (``"\\ud800"``: valid JSON, but no text)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if nested_deeper_than(data):
        raise BadRequest(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects")
    try:
        parsed: Any = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed {what}: {e}") from None
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits (Python's int-parsing limit)
        raise BadRequest(f"malformed {what}: {e}") from None
    if _SURROGATE_ESCAPE.search(data):
        where = _lone_surrogate(parsed, "")
        if where is not None:
            raise BadRequest(
                f"{what}: {where} holds a lone surrogate (a \\ud800-\\udfff escape without its "
                "pair): not text"
            )
    return parsed


async def read_json(request: Request, model: type[M]) -> M:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise BadRequest(f"unsupported content type {ctype!r}: send application/json or multipart/form-data")
    raw = await request.body()
    if not raw:
        raise BadRequest("empty request body: expected a JSON object")
    data = parse_json(raw)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise BadRequest(validation_message(e.errors())) from None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


async def read_form(
    request: Request, *, max_files: int, max_fields: int, what: str
) -> tuple[list[tuple[str, bytes]], dict[str, list[str]]]:
    """(files as (filename, bytes), other fields as lists of strings) of a multipart body.

    Parts are counted while the body is parsed (on the event loop): the first part past ``max_files``
    files or ``max_fields`` other fields ends the request with :class:`TooLarge`, before the rest is read.
    """
    try:
        form = await request.form(max_files=max_files, max_fields=max_fields)
    except (BodyTooLarge, BodyTooSlow):  # the body middleware answers these (413, 408)
        raise
    except Exception as e:  # starlette raises several types for broken multipart bodies
        text = str(getattr(e, "detail", "") or e)
        if "Too many files" in text:
            raise TooLarge(
                f"{what} takes at most {_plural(max_files, 'file')} in a multipart body: the body has more"
            ) from None
        if "Too many fields" in text:
            raise TooLarge(
                f"{what} takes at most {_plural(max_fields, 'field')} besides its files in a "
                "multipart body: the body has more"
            ) from None
        raise BadRequest(f"malformed multipart body: {text}") from None
    files: list[tuple[str, bytes]] = []
    fields: dict[str, list[str]] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.append((value.filename or key, await value.read()))
        else:
            fields.setdefault(key, []).append(str(value))
    return files, fields
