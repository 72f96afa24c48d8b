"""An item's kept source image (the bytes it was ingested with), so a page or a client can show a hit.

Unauthenticated like the other reads. The bytes are served with the media type their magic bytes say
(PNG, JPEG or WebP; anything else as an opaque download) and ``nosniff``, so stored bytes are never run
as a page. Blobs are content-addressed: the ETag is their digest, and a revalidation answers 304.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from index.errors import ItemNotFound
from service.api.deps import BlobsDep, GalleryDep
from service.blobs import OPAQUE, media_type
from service.errors import NoSourceKept
from service.schemas import ErrorResponse

router = APIRouter(prefix="/v1/items", tags=["items"])


@router.get(
    "/{external_id}/image",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
        404: {"model": ErrorResponse},
    },
    summary="The item's kept source image (404 if the item is unknown or its source was not kept)",
)
def item_image(external_id: str, request: Request, gallery: GalleryDep, blobs: BlobsDep) -> Response:
    rec = gallery.get_items([external_id]).get(external_id)
    if rec is None:
        raise ItemNotFound([external_id])
    if rec.source_uri is None:
        raise NoSourceKept(
            f"item {external_id[:200]!r} has no kept source image: it was ingested while "
            "GRACEFUL_KEEP_SOURCES was off"
        )
    etag = '"' + rec.source_uri.removeprefix("blob:") + '"'
    headers = {
        "ETag": etag,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'",
    }
    if request.headers.get("if-none-match") == etag and blobs.exists(rec.source_uri):
        return Response(status_code=304, headers=headers)
    data = blobs.get(rec.source_uri)
    if data is None:
        raise NoSourceKept(f"the source image of item {external_id[:200]!r} is missing from the blob store")
    kind = media_type(data)
    if kind == OPAQUE:
        headers["Content-Disposition"] = "attachment"
    return Response(data, media_type=kind, headers=headers)
