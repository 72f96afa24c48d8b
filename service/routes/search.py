"""Search the gallery by image, by vector (with the version that made it), or by an existing item."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from index.errors import UnknownVersion
from service.errors import BadRequest, IncompatibleModel, ModelNotFound
from service.images import decode_base64, decode_image
from service.registry import backfill_report_url
from service.routes._body import is_multipart, read_form, read_json
from service.schemas import SearchHit, SearchRequest, SearchResponse
from service.state import AppState, State

router = APIRouter(prefix="/v1", tags=["search"])

_SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SearchRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
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


def _by_image(state: AppState, raw: bytes, k: int, include_metadata: bool = True) -> SearchResponse:
    active = state.registry.require_active()  # captured once: a swap mid-request does not affect it
    image = decode_image(raw, channels=active.channels, size=active.input_size,
                         max_pixels=state.settings.max_image_pixels, what="query image")
    vec = active.embed(image[None])
    state.metrics.embedded.labels(version=active.version, purpose="query").inc()
    hits = state.gallery.search(active.space, vec, k)[0]
    return _respond(state, active.version, active.space, hits, include_metadata)


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


@router.post("/search", response_model=SearchResponse, openapi_extra=_SEARCH_BODY,
             summary="Search by image_base64, by vector + model_version, or by item_id")
async def search(request: Request, state: State) -> SearchResponse:
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
        return await run_in_threadpool(_by_image, state, files[0][1], k)
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
        return await run_in_threadpool(_by_image, state, raw, body.k, body.include_metadata)
    if body.vector is not None:
        if body.model_version is None:
            raise BadRequest("a vector needs model_version: the version that embedded it")
        return await run_in_threadpool(_by_vector, state, body.vector, body.model_version, body.k,
                                       body.include_metadata)
    assert body.item_id is not None
    if body.model_version is not None:
        raise BadRequest("model_version goes with vector, not item_id")
    return await run_in_threadpool(_by_item, state, body.item_id, body.k, body.include_metadata)
