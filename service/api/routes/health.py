"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.api.deps import GalleryDep, MetricsDep, SwapDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Ready to serve: the gallery is open and a model is active")
def readyz(swap: SwapDep, gallery: GalleryDep) -> Response:
    active = swap.active
    if active is None:
        return JSONResponse({"status": "not ready", "detail": "no model is active"}, status_code=503)
    # followed: the database change counter this replica has applied up to (replicas compare it)
    return JSONResponse(
        {
            "status": "ready",
            "active_model": active.version,
            "space": active.space,
            "followed": gallery.followed,
        }
    )


@router.get("/metrics", summary="Prometheus metrics")
def metrics(metrics: MetricsDep, gallery: GalleryDep) -> Response:
    metrics.items.set(gallery.count())
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")
