"""Ingest and delete gallery items.

Ingest goes through the ingest micro-batcher (:mod:`service.serving.ingest`): concurrent requests share
one model forward and one SQL transaction, each request still all-or-nothing. A JSON ingest carries images
(embedded by the active version) or vectors computed outside graceful, each with its ``model_version``
(one version per request), never both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from index.errors import ItemNotFound
from index.store import ItemRecord
from index.validation import check_external_ids
from service.api.auth import WRITE
from service.api.bodies import is_multipart, parse_json, read_form, read_json
from service.api.deps import GalleryDep, IngestDep, SettingsDep
from service.errors import BadRequest, TooLarge
from service.images import decode_base64
from service.schemas import (
    MAX_IDS_PER_REQUEST,
    DeleteResponse,
    ExternalIdsRequest,
    IngestRequest,
    IngestResponse,
    ItemResponse,
    ItemsDeleteResponse,
    ItemsGetResponse,
    ItemsPage,
    MetadataPatch,
    external_id_problem,
)
from service.serving.deadlines import deadline_in
from service.serving.ingest import IngestJob, VectorJob
from service.settings import Settings

router = APIRouter(prefix="/v1/items", tags=["items"])


def _inline(schema: dict) -> dict:
    """A pydantic JSON schema with its ``$defs`` inlined: the OpenAPI document has no such components, so a
    ``$ref`` to them would dangle (clients and fuzzers could not build a valid body)."""
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


_MULTIPART_SCHEMA = {
    "type": "object",
    "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "external_id": {
            "type": "array",
            "items": {"type": "string"},
            "description": "one per file, in order (default: the file name without extension)",
        },
        "metadata": {"type": "array", "items": {"type": "string"}, "description": "one JSON object per file"},
        "upsert": {"type": "boolean"},
    },
    "required": ["files"],
}
_INGEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inline(IngestRequest.model_json_schema())},
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
        },
    }
}


def _check_rows(settings: Settings, rows: Sequence[tuple[str, Any, dict | None]]) -> None:
    if not rows:
        raise BadRequest("empty batch: send at least one item")
    if len(rows) > settings.max_batch_items:
        raise TooLarge(f"batch of {len(rows)} items exceeds the limit of {settings.max_batch_items}")
    seen: set[str] = set()
    for eid, _, _ in rows:
        if eid in seen:
            raise BadRequest(f"duplicate external id {eid!r} inside one batch")
        seen.add(eid)


@router.post(
    "",
    response_model=IngestResponse,
    dependencies=WRITE,
    openapi_extra=_INGEST_BODY,
    summary="Ingest images (JSON with base64 PNG/JPEG, or multipart files), embedded by the active model, "
    "or vectors computed outside graceful (JSON, with the version that made them)",
)
async def ingest(request: Request, settings: SettingsDep, path: IngestDep) -> Response:
    deadline = deadline_in(settings.request_timeout_s)
    with path.arriving():  # the batcher may wait for this request while its body is read
        job = await _read_job(request, settings)
        _check_rows(settings, job.rows)
        pending = path.start(job, deadline)
    answer = await pending
    return Response(answer.model_dump_json(), media_type="application/json")


def _vector_job(body: IngestRequest) -> VectorJob | None:
    """The vector ingest a JSON body asks for (None: it holds images). Refuses a mix of images and
    vectors, and vectors of several versions (one request is one version's transaction)."""
    vectors = [it for it in body.items if it.vector is not None]
    if not vectors:
        return None
    if len(vectors) != len(body.items):
        raise BadRequest("an ingest holds images or vectors, not both: send them in separate requests")
    versions = sorted({str(it.model_version) for it in vectors})
    if len(versions) > 1:
        raise BadRequest(
            f"every vector of one ingest must come from one model_version, found {', '.join(versions[:5])}: "
            "send each version's vectors in a request of its own"
        )
    rows = [(it.external_id, it.vector, it.metadata) for it in vectors if it.vector is not None]
    return VectorJob(rows, versions[0], body.upsert)


async def _read_job(request: Request, settings: Settings) -> IngestJob | VectorJob:
    """The ingest a JSON or multipart body asks for: images as (external_id, image bytes, metadata) rows,
    or (JSON only) vectors with their version; with its upsert flag."""
    rows: list[tuple[str, bytes, dict | None]] = []
    upsert = False
    if is_multipart(request):
        n = settings.max_batch_items  # one external_id and one metadata field per file, upsert, and slack
        files, fields = await read_form(request, max_files=n, max_fields=2 * n + 4, what="an ingest")
        ids = fields.get("external_id", [])
        metas = fields.get("metadata", [])
        if ids and len(ids) != len(files):
            raise BadRequest(
                f"{len(ids)} external_id fields for {len(files)} files: give one per file or none"
            )
        if metas and len(metas) != len(files):
            raise BadRequest(
                f"{len(metas)} metadata fields for {len(files)} files: give one per file or none"
            )
        upsert = fields.get("upsert", ["false"])[-1].lower() in ("1", "true", "yes")
        for i, (name, raw) in enumerate(files):
            eid = ids[i] if ids else PurePath(name).stem
            meta = None
            problem = external_id_problem(eid)
            if problem:
                raise BadRequest(f"file {i}: {problem}")
            if metas:
                meta = parse_json(metas[i], f"metadata of item {eid!r}")
                if meta is not None and not isinstance(meta, dict):
                    raise BadRequest(f"metadata of item {eid!r} must be a JSON object")
            rows.append((eid, raw, meta))
    else:
        body = await read_json(request, IngestRequest)
        vectors = _vector_job(body)
        if vectors is not None:
            return vectors
        upsert = body.upsert
        for it in body.items:
            assert it.image_base64 is not None  # an item holds an image or a vector (IngestItem)
            rows.append(
                (it.external_id, decode_base64(it.image_base64, f"item {it.external_id!r}"), it.metadata)
            )
    return IngestJob(rows, upsert)


@router.get(
    "/{external_id}", response_model=ItemResponse, summary="One stored item: metadata and who embedded it"
)
def get_item(external_id: str, gallery: GalleryDep) -> ItemResponse:
    rec = gallery.get_items([external_id]).get(external_id)
    if rec is None:
        raise ItemNotFound([external_id])
    return item_response(rec)


def item_response(rec: ItemRecord) -> ItemResponse:
    return ItemResponse(
        external_id=rec.external_id,
        metadata=rec.metadata,
        embedded_by=rec.embedded_by,
        has_source=rec.source_uri is not None,
        created_at=rec.created_at.isoformat(),
        updated_at=rec.updated_at.isoformat(),
    )


@router.delete(
    "/{external_id}",
    response_model=DeleteResponse,
    dependencies=WRITE,
    summary="Delete one item (and its kept source bytes, unless another item has the same bytes)",
)
def delete_item(external_id: str, path: IngestDep) -> DeleteResponse:
    path.delete([external_id])
    return DeleteResponse(deleted=external_id)


# ---------------------------------------------------------------------- browsing and batches


def _json_body(model: type[BaseModel]) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inline(model.model_json_schema())}},
        }
    }


def _unique(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(ids))


@router.get(
    "",
    response_model=ItemsPage,
    summary="Scroll the gallery in external-id order: a page of items after `after`, and the next cursor",
)
def list_items(
    gallery: GalleryDep,
    after: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=512,
            description="the last external id of the previous page (omit: first page)",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="items per page")] = 100,
) -> ItemsPage:
    records = gallery.scroll(after, limit)
    return ItemsPage(
        items=[item_response(r) for r in records],
        next=records[-1].external_id if len(records) == limit else None,
    )


@router.post(
    "/get",
    response_model=ItemsGetResponse,
    openapi_extra=_json_body(ExternalIdsRequest),
    summary=f"Several items by external id (1-{MAX_IDS_PER_REQUEST}): those found, and the missing ids",
)
async def get_items(request: Request, gallery: GalleryDep) -> ItemsGetResponse:
    ids = check_external_ids(_unique((await read_json(request, ExternalIdsRequest)).external_ids))
    found = await run_in_threadpool(gallery.get_items, ids)
    return ItemsGetResponse(
        items=[item_response(found[e]) for e in ids if e in found], missing=[e for e in ids if e not in found]
    )


@router.post(
    "/delete",
    response_model=ItemsDeleteResponse,
    dependencies=WRITE,
    openapi_extra=_json_body(ExternalIdsRequest),
    summary=f"Delete several items (1-{MAX_IDS_PER_REQUEST}, one transaction); unknown ids are listed "
    "as missing",
)
async def delete_items(request: Request, path: IngestDep) -> ItemsDeleteResponse:
    ids = _unique((await read_json(request, ExternalIdsRequest)).external_ids)
    deleted, missing = await run_in_threadpool(path.delete_many, ids)
    return ItemsDeleteResponse(deleted=deleted, missing=missing)


@router.patch(
    "/{external_id}",
    response_model=ItemResponse,
    dependencies=WRITE,
    openapi_extra=_json_body(MetadataPatch),
    summary="Change an item's metadata (merge: null removes a key; or replace); validated like an ingest",
)
async def patch_item(external_id: str, request: Request, gallery: GalleryDep) -> ItemResponse:
    body = await read_json(request, MetadataPatch)
    return item_response(
        await run_in_threadpool(gallery.update_metadata, external_id, body.metadata, merge=body.merge)
    )
