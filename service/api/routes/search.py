"""Search the gallery by image, by vector (with the version that made it), or by an existing item.

The route parses the body into a query and hands it to the search path (:mod:`service.serving.search`),
which batches image queries and answers within ``GRACEFUL_REQUEST_TIMEOUT_S`` or 503/504.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.bodies import is_multipart, read_form, read_json
from service.api.deps import SearchDep, SettingsDep
from service.errors import BadRequest
from service.images import decode_base64
from service.schemas import SearchRequest, SearchResponse
from service.serving.deadlines import deadline_in
from service.serving.search import ImageQuery, ItemQuery, Query, VectorQuery

router = APIRouter(prefix="/v1", tags=["search"])

# A multipart search is one image and a few fields (k; room for what clients add): parsing stops past these.
MAX_SEARCH_FIELDS = 8

_COMMON = {
    "k": {"type": "integer", "minimum": 1, "default": 10, "description": "hits wanted (at most GRACEFUL_MAX_K)"},
    "include_metadata": {"type": "boolean", "default": True,
                         "description": "false skips the metadata lookup (faster for large k)"},
}


def _one_of(required: dict, description: str) -> dict:
    return {"type": "object", "description": description, "additionalProperties": False,
            "properties": {**required, **_COMMON}, "required": list(required)}


# The JSON body is exactly one of three shapes (SearchRequest checks the same at run time); saying so in the
# spec lets clients and fuzzers build valid requests.
_SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"oneOf": [
                _one_of({"image_base64": {"type": "string", "minLength": 1}},
                        "by image (PNG or JPEG, base64), embedded by the active model"),
                _one_of({"vector": {"type": "array", "items": {"type": "number"}, "minItems": 1},
                         "model_version": {"type": "string", "minLength": 1}},
                        "by a vector, with the model version that embedded it"),
                _one_of({"item_id": {"type": "string", "minLength": 1}}, "by a stored item's embedding"),
            ]}},
            "multipart/form-data": {"schema": {
                "type": "object",
                "properties": {"image": {"type": "string", "format": "binary"}, "k": {"type": "integer", "minimum": 1}},
                "required": ["image"],
            }},
        },
    }
}


@router.post("/search", response_model=SearchResponse, openapi_extra=_SEARCH_BODY,
             summary="Search by image_base64, by vector + model_version, or by item_id")
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
    body = await read_json(request, SearchRequest)
    if body.k > max_k:
        raise BadRequest(f"k must be between 1 and {max_k}, got {body.k}")
    given = [name for name in ("image_base64", "vector", "item_id") if getattr(body, name) is not None]
    if len(given) != 1:
        raise BadRequest("give exactly one of image_base64, vector (with model_version) or item_id"
                         + (f"; got {', '.join(given)}" if given else ""))
    if body.image_base64 is not None:
        if body.model_version is not None:
            raise BadRequest("model_version goes with vector: an image is embedded by the active model")
        return ImageQuery(decode_base64(body.image_base64, "query image"), body.k, body.include_metadata)
    if body.vector is not None:
        if body.model_version is None:
            raise BadRequest("a vector needs model_version: the version that embedded it")
        return VectorQuery(body.vector, body.model_version, body.k, body.include_metadata)
    assert body.item_id is not None
    if body.model_version is not None:
        raise BadRequest("model_version goes with vector, not item_id")
    return ItemQuery(body.item_id, body.k, body.include_metadata)
