"""The gallery's search indexes: what serves each embedding space and how exact it is; rebuild on demand."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from index import Gallery
from service.api.auth import WRITE
from service.api.deps import GalleryDep
from service.schemas import ErrorResponse, IndexBuild, IndexResponse, RebuildResponse, SpaceIndexInfo

router = APIRouter(prefix="/v1/index", tags=["index"])


def _info(gallery: Gallery, space: str) -> SpaceIndexInfo:
    i = gallery.index_info(space)
    exact = i["built_factory"] == "Flat"
    last = i["last_build"]
    return SpaceIndexInfo(
        space=space,
        dim=i["dim"],
        factory=i["factory"],
        built_factory=i["built_factory"],
        exact=exact,
        recall=1.0 if exact else (last or {}).get("recall"),
        live=i["live"],
        tombstones=i["tombstones"],
        params=i["params"],
        building=i["building"],
        last_build=IndexBuild(**{k: v for k, v in last.items() if k in IndexBuild.model_fields})
        if last
        else None,
    )


@router.get(
    "",
    response_model=IndexResponse,
    summary="Each space's index: its factory, whether it is exact, its recall vs exact, builds",
)
def index_status(gallery: GalleryDep) -> IndexResponse:
    return IndexResponse(spaces=[_info(gallery, s) for s in gallery.spaces()])


@router.post(
    "/{space}/rebuild",
    response_model=RebuildResponse,
    dependencies=WRITE,
    status_code=202,
    responses={404: {"model": ErrorResponse}},
    summary="Rebuild a space's index from the database (in the background; measures its recall)",
)
async def rebuild(space: str, gallery: GalleryDep) -> RebuildResponse:
    started = await run_in_threadpool(gallery.rebuild_index, space, "asked for over HTTP")
    return RebuildResponse(space=space, started=started)
