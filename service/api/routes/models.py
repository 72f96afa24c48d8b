"""Model versions: list, active, activate (hot swap guarded by compatibility), rollback."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from service.auth import WRITE
from service.errors import IncompatibleModel
from service.registry import ActivationResult
from service.schemas import ActivationResponse, ActiveResponse, ErrorResponse, ModelInfo, ModelsResponse
from service.state import AppState, State

router = APIRouter(prefix="/v1/models", tags=["models"])


def _list(state: AppState) -> ModelsResponse:
    registry = state.registry
    active = registry.active
    out = []
    for e in registry.scan():
        if e.card is None:
            out.append(ModelInfo(version=e.version, valid=False, error=e.error))
            continue
        problem = registry.gallery_space_problem(e.card)
        out.append(ModelInfo(
            version=e.version, valid=True, space=e.card.space, compatible_with=e.card.compatible_with,
            adapter_of=e.card.adapter_of, embedding_dim=e.card.embedding_dim, classes=e.card.classes,
            active=bool(active and active.version == e.version), can_activate=problem is None, reason=problem,
        ))
    return ModelsResponse(active=active.version if active else None, models=out)


@router.get("", response_model=ModelsResponse, summary="Every model folder: valid ones, and refused ones with why")
def list_models(state: State) -> ModelsResponse:
    return _list(state)


@router.get("/active", response_model=ActiveResponse, responses={503: {"model": ErrorResponse}})
def active_model(state: State) -> ActiveResponse:
    a = state.registry.require_active()
    return ActiveResponse(version=a.version, space=a.space, activated_at=a.activated_at,
                          card=a.card.model_dump(mode="json"))


def _done(state: AppState, r: ActivationResult) -> ActivationResponse:
    state.metrics.activations.labels(version=r.version, outcome="ok").inc()
    state.metrics.set_active(r.version, r.space)
    return ActivationResponse(active=r.version, previous=r.previous, space=r.space, seconds=round(r.seconds, 4),
                              reembedded=r.reembedded)


@router.post("/{version}/activate", response_model=ActivationResponse, dependencies=WRITE,
             responses={409: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
             summary="Hot-swap to a version (refused with 409 if its embeddings are incompatible with the gallery)")
async def activate(version: str, state: State) -> ActivationResponse:
    try:
        result = await run_in_threadpool(state.registry.activate, version)
    except IncompatibleModel:
        state.metrics.activations.labels(version=version, outcome="refused").inc()
        raise
    return _done(state, result)


@router.post("/rollback", response_model=ActivationResponse, dependencies=WRITE,
             responses={409: {"model": ErrorResponse}}, summary="Re-activate the version active before this one")
async def rollback(state: State) -> ActivationResponse:
    return _done(state, await run_in_threadpool(state.registry.rollback))
