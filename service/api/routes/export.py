"""A seeded sample of the gallery's kept source images as a ZIP (unlabeled images for training).

Unauthenticated like the item image route it generalises (reads of stored images need no key). The archive
is built in a spooled temporary file by :func:`service.export.export_sources`, then streamed.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from service.api.deps import BlobsDep, GalleryDep, SettingsDep
from service.export import export_sources
from service.schemas import ErrorResponse

router = APIRouter(prefix="/v1/gallery", tags=["gallery"])


@router.get(
    "/sources/export",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/zip": {}}},
        409: {"model": ErrorResponse, "description": "no item has a kept source image"},
        422: {"model": ErrorResponse, "description": "sample outside 1..GRACEFUL_EXPORT_MAX_SAMPLE"},
    },
    summary="A ZIP of a seeded random sample of the items' kept source images, with manifest.json",
)
def export_gallery_sources(
    gallery: GalleryDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    # bounds checked by export_sources, so the 422 names GRACEFUL_EXPORT_MAX_SAMPLE
    sample: Annotated[int, Query(description="items to draw (all when at least their count)")],
    seed: Annotated[int, Query(ge=0, le=2**63 - 1, description="seed of the draw")] = 0,
) -> StreamingResponse:
    # a sync route: the blob reads and the archive's writes run in the threadpool, not the event loop
    export = export_sources(gallery, blobs, sample, seed, settings.export_max_sample)
    m = export.manifest
    headers = {
        "Content-Length": str(export.size),
        "Content-Disposition": f'attachment; filename="graceful-sources-seed{seed}-{m["written"]}.zip"',
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }
    return StreamingResponse(export.chunks(), media_type="application/zip", headers=headers)
