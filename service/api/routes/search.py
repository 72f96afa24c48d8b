"""Search the gallery by image, by vector (with the version that made it), or by an existing item.

Image searches go through the search micro-batcher (:mod:`service.search_pipeline`): concurrent queries
share one model forward and one FAISS search. Vector and item searches need no forward and run directly.
Every search answers within ``GRACEFUL_REQUEST_TIMEOUT_S`` or gets 503/504 (:mod:`service.deadlines`).
"""

from __future__ import annotations

from functools import partial

import numpy as np
from fastapi import APIRouter, Request, Response

from index.errors import UnknownVersion
from service.deadlines import deadline_in, result_within, run_within
from service.errors import BadRequest, IncompatibleModel, ModelNotFound
from service.images import decode_base64, decode_image
from service.registry import ActiveModel, backfill_report_url
from service.routes._body import is_multipart, read_form, read_json
from service.schemas import SearchHit, SearchRequest, SearchResponse
from service.search_pipeline import SearchJob
from service.state import AppState, State

router = APIRouter(prefix="/v1", tags=["search"])

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


def _respond(state: AppState, version: str, space: str, hits, include_metadata: bool = True) -> SearchResponse:
    meta = state.gallery.get_metadata([h.external_id for h in hits]) if (include_metadata and hits) else {}
    return SearchResponse(model_version=version, space=space, hits=[
        SearchHit(external_id=h.external_id, score=h.score, embedded_by=h.embedded_by, metadata=meta.get(h.external_id))
        for h in hits
    ])


def _by_vector(state: AppState, vector: list[float], version: str, k: int, include_metadata: bool) -> SearchResponse:
    try:
        info = state.gallery.get_version(version)
    except UnknownVersion:
        raise ModelNotFound(f"unknown model version {version!r}") from None
    active = state.registry.active
    space = active.space if active else info.space
    if info.space != space:
        raise IncompatibleModel(
            f"the vector comes from {version}, which embeds into space {info.space!r}, but the gallery serves "
            f"space {space!r}: the embeddings are not comparable (see {backfill_report_url(version)})",
            candidate=version,
        )
    hits = state.gallery.search(space, np.asarray(vector, dtype=np.float64)[None], k, version=version)[0]
    return _respond(state, version, space, hits, include_metadata)


def _by_item(state: AppState, item_id: str, k: int, include_metadata: bool) -> SearchResponse:
    active = state.registry.require_active()
    vec, version = state.gallery.get_embedding(item_id, active.space)
    hits = [h for h in state.gallery.search(active.space, vec[None], k + 1)[0] if h.external_id != item_id][:k]
    return _respond(state, version, active.space, hits, include_metadata)


def _image_job(state: AppState, raw: bytes, k: int, include_metadata: bool) -> tuple[ActiveModel, SearchJob]:
    """Capture the active model once (the answer names it, whatever swaps happen meanwhile) and decode."""
    active = state.registry.require_active()
    image = decode_image(raw, channels=active.channels, size=active.input_size,
                         max_pixels=state.settings.max_image_pixels, what="query image")
    return active, SearchJob(image=image, k=k, include_metadata=include_metadata)


@router.post("/search", response_model=SearchResponse, openapi_extra=_SEARCH_BODY,
             summary="Search by image_base64, by vector + model_version, or by item_id")
async def search(request: Request, state: State) -> Response:
    deadline = deadline_in(state.settings.request_timeout_s)
    batcher = state.search_batcher
    assert batcher is not None
    with batcher.announce():  # the batcher may wait for this request while its body is read
        job = await _parse(request, state)
        if isinstance(job, tuple):
            future = batcher.submit(*job, deadline=deadline)
    if isinstance(job, tuple):
        answer = await result_within(future, deadline, "the search", outcome_if_late="nothing was changed")
    else:
        answer = await run_within(job, deadline=deadline, what="the search")
    # serialised here (pydantic, in Rust): the hot path skips FastAPI's re-validation of response_model
    return Response(answer.model_dump_json(), media_type="application/json")


async def _parse(request: Request, state: AppState):
    """An image search as ``(active model, SearchJob)``, or a vector / item search as a callable."""
    max_k = state.settings.max_k
    if is_multipart(request):
        files, fields = await read_form(request)
        if len(files) != 1:
            raise BadRequest(f"multipart search needs exactly one image file, got {len(files)}")
        try:
            k = int(fields.get("k", ["10"])[-1])
        except ValueError:
            raise BadRequest("k must be an integer") from None
        if not 1 <= k <= max_k:
            raise BadRequest(f"k must be between 1 and {max_k}, got {k}")
        return _image_job(state, files[0][1], k, True)
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
        raw = decode_base64(body.image_base64, "query image")
        return _image_job(state, raw, body.k, body.include_metadata)
    if body.vector is not None:
        if body.model_version is None:
            raise BadRequest("a vector needs model_version: the version that embedded it")
        return partial(_by_vector, state, body.vector, body.model_version, body.k, body.include_metadata)
    assert body.item_id is not None
    if body.model_version is not None:
        raise BadRequest("model_version goes with vector, not item_id")
    return partial(_by_item, state, body.item_id, body.k, body.include_metadata)
