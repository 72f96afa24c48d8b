"""Search the gallery by image, by vector (with the version that made it), or by an existing item.

The route parses the body into a query and hands it to the search path (:mod:`service.serving.search`),
which batches image queries and answers within ``GRACEFUL_REQUEST_TIMEOUT_S`` or 503/504.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Request, Response

from index.filters import (
    MAX_FILTER_KEYS,
    MAX_FILTER_VALUES,
    MAX_KEY_LENGTH,
    MAX_STRING_VALUE_LENGTH,
    MetadataFilter,
)
from service.api.bodies import is_multipart, read_form, read_json
from service.api.deps import SearchDep, SettingsDep
from service.errors import BadRequest
from service.images import decode_base64
from service.schemas import (
    FILTER_DESCRIPTION,
    MAX_BATCH_SEARCHES,
    BatchSearchRequest,
    BatchSearchResponse,
    SearchRequest,
    SearchResponse,
    filter_spec,
)
from service.serving.deadlines import deadline_in
from service.serving.search import ImageQuery, ItemQuery, Query, VectorQuery

router = APIRouter(prefix="/v1", tags=["search"])

# A multipart search is one image and a few fields (k; room for what clients add): parsing stops past these.
MAX_SEARCH_FIELDS = 8

_SCALAR: list[dict[str, Any]] = [
    {"type": "string", "maxLength": MAX_STRING_VALUE_LENGTH},
    {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
    {"type": "number"},
    {"type": "boolean"},
]
_FILTER = {
    "type": "object",
    "maxProperties": MAX_FILTER_KEYS,
    "description": FILTER_DESCRIPTION,
    "propertyNames": {"minLength": 1, "maxLength": MAX_KEY_LENGTH},
    "additionalProperties": {
        "anyOf": [
            *_SCALAR,
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["in"],
                "properties": {
                    "in": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": MAX_FILTER_VALUES,
                        "items": {"anyOf": _SCALAR},
                    }
                },
            },
        ]
    },
}
_COMMON = {
    "k": {
        "type": "integer",
        "minimum": 1,
        "default": 10,
        "description": "hits wanted (at most GRACEFUL_MAX_K)",
    },
    "include_metadata": {
        "type": "boolean",
        "default": True,
        "description": "false skips the metadata lookup (faster for large k)",
    },
    "filter": _FILTER,
}


def _one_of(required: dict, description: str) -> dict:
    return {
        "type": "object",
        "description": description,
        "additionalProperties": False,
        "properties": {**required, **_COMMON},
        "required": list(required),
    }


# The JSON body is exactly one of three shapes (SearchRequest checks the same at run time); saying so in the
# spec lets clients and fuzzers build valid requests.
_JSON_SEARCH = {
    "oneOf": [
        _one_of(
            {"image_base64": {"type": "string", "minLength": 1}},
            "by image (PNG or JPEG, base64), embedded by the active model",
        ),
        _one_of(
            {
                "vector": {"type": "array", "items": {"type": "number"}, "minItems": 1},
                "model_version": {"type": "string", "minLength": 1},
            },
            "by a vector, with the model version that embedded it",
        ),
        _one_of({"item_id": {"type": "string", "minLength": 1}}, "by a stored item's embedding"),
    ]
}
_SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _JSON_SEARCH},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "k": {"type": "integer", "minimum": 1},
                    },
                    "required": ["image"],
                }
            },
        },
    }
}


@router.post(
    "/search",
    response_model=SearchResponse,
    openapi_extra=_SEARCH_BODY,
    summary="Search by image_base64, by vector + model_version, or by item_id",
)
async def search(request: Request, settings: SettingsDep, path: SearchDep) -> Response:
    deadline = deadline_in(settings.request_timeout_s)
    with path.arriving():  # the batcher may wait for this request while its body is read
        query = await _parse(request, settings.max_k)
        pending = path.start(query, deadline)
    answer = await pending
    # serialised here (pydantic, in Rust): the hot path skips FastAPI's re-validation of response_model
    return Response(answer.model_dump_json(), media_type="application/json")


async def _parse(request: Request, max_k: int) -> Query:
    """The query of a JSON or multipart search body (domain errors name what is wrong)."""
    if is_multipart(request):
        files, fields = await read_form(request, max_files=1, max_fields=MAX_SEARCH_FIELDS, what="a search")
        if len(files) != 1:
            raise BadRequest(f"multipart search needs exactly one image file, got {len(files)}")
        try:
            k = int(fields.get("k", ["10"])[-1])
        except ValueError:
            raise BadRequest("k must be an integer") from None
        if not 1 <= k <= max_k:
            raise BadRequest(f"k must be between 1 and {max_k}, got {k}")
        return ImageQuery(files[0][1], k)
    return _query_of(await read_json(request, SearchRequest), max_k)


def _query_of(body: SearchRequest, max_k: int) -> Query:
    """The query of a parsed JSON search body."""
    if body.k > max_k:
        raise BadRequest(f"k must be between 1 and {max_k}, got {body.k}")
    given = [name for name in ("image_base64", "vector", "item_id") if getattr(body, name) is not None]
    if len(given) != 1:
        raise BadRequest(
            "give exactly one of image_base64, vector (with model_version) or item_id"
            + (f"; got {', '.join(given)}" if given else "")
        )
    flt = MetadataFilter.parse(filter_spec(body.filter))  # InvalidInput (422) names what is wrong
    if body.image_base64 is not None:
        if body.model_version is not None:
            raise BadRequest("model_version goes with vector: an image is embedded by the active model")
        return ImageQuery(decode_base64(body.image_base64, "query image"), body.k, body.include_metadata, flt)
    if body.vector is not None:
        if body.model_version is None:
            raise BadRequest("a vector needs model_version: the version that embedded it")
        return VectorQuery(body.vector, body.model_version, body.k, body.include_metadata, flt)
    assert body.item_id is not None
    if body.model_version is not None:
        raise BadRequest("model_version goes with vector, not item_id")
    return ItemQuery(body.item_id, body.k, body.include_metadata, flt)


_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["searches"],
                    "properties": {
                        "searches": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_BATCH_SEARCHES,
                            "items": _JSON_SEARCH,
                        }
                    },
                }
            }
        },
    }
}


@router.post(
    "/search/batch",
    response_model=BatchSearchResponse,
    openapi_extra=_BATCH_BODY,
    summary=f"Several searches (1-{MAX_BATCH_SEARCHES} JSON search bodies) in one request, answered in order",
)
async def search_batch(request: Request, settings: SettingsDep, path: SearchDep) -> Response:
    """Every search is parsed first (a bad one refuses the request, nothing searched), then all start at
    once (image queries share micro-batches). A search that fails answers the whole request with its error."""
    deadline = deadline_in(settings.request_timeout_s)
    pending: list[Awaitable[SearchResponse]] = []
    with path.arriving():
        body = await read_json(request, BatchSearchRequest)
        queries = [_query_of(b, settings.max_k) for b in body.searches]
        try:
            for q in queries:
                pending.append(path.start(q, deadline))
        except BaseException:
            for p in pending:  # started searches finish in their workers; nobody awaits their answers
                close = getattr(p, "close", None)
                if close is not None:
                    close()
            raise
    answers = await asyncio.gather(*pending, return_exceptions=True)
    for a in answers:
        if isinstance(a, BaseException):
            raise a
    results = [a for a in answers if isinstance(a, SearchResponse)]
    return Response(BatchSearchResponse(results=results).model_dump_json(), media_type="application/json")
