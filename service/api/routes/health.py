"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.state import State

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Ready to serve: the gallery is open and a model is active")
def readyz(state: State) -> Response:
    active = state.registry.active
    if active is None:
        return JSONResponse({"status": "not ready", "detail": "no model is active"}, status_code=503)
    return JSONResponse({"status": "ready", "active_model": active.version, "space": active.space})


@router.get("/metrics", summary="Prometheus metrics")
def metrics(state: State) -> Response:
    state.metrics.items.set(state.gallery.count())
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")
