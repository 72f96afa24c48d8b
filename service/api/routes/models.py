"""Model versions: list, active, activate (hot swap guarded by compatibility), rollback."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from index import Gallery
from service.api.auth import WRITE
from service.api.deps import GalleryDep, MetricsDep, RegistryDep, ShadowDep, SwapDep
from service.errors import IncompatibleModel
from service.models.hot_swap import ActivationResult
from service.models.lineage import lineage, parents_of
from service.models.rollback import rollback_note, rollback_refusal
from service.observability import Metrics
from service.schemas import (
    ActivationRecord,
    ActivationResponse,
    ActivationsResponse,
    ActiveResponse,
    ErrorResponse,
    GalleryGenerations,
    ModelInfo,
    ModelsResponse,
    RollbackNote,
)
from trainer import list_transforms

router = APIRouter(prefix="/v1/models", tags=["models"])

# A version is a model folder's name: 1-128 letters, digits, '.', '_' or '-', starting alphanumeric (the rule
# trainer applies to the cards it writes); anything else is refused before the models dir is looked at.
Version = Annotated[
    str,
    Path(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="a model version (the name of its folder in the models dir)",
    ),
]

# What GET /v1/models/active shows of a card: what a client needs to use the model, not how or where it was
# trained (the card's train_config holds local paths).
PUBLIC_CARD_KEYS = (
    "format",
    "version",
    "arch",
    "embedding_dim",
    "classes",
    "space",
    "compatible_with",
    "adapter_of",
    "preprocess",
    "metrics",
)


@router.get(
    "", response_model=ModelsResponse, summary="Every model folder: valid ones, and refused ones with why"
)
def list_models(registry: RegistryDep, swap: SwapDep, gallery: GalleryDep) -> ModelsResponse:
    active = swap.active
    out = []
    entries = registry.survey()  # reads folders, writes nothing
    parents = parents_of([e.card for e in entries if e.card is not None], gallery)
    for e in entries:
        if e.card is None:
            out.append(ModelInfo(version=e.version, valid=False, error=e.error))
            continue
        problem = swap.problem(e.card)
        line = lineage(e.version, parents)
        out.append(
            ModelInfo(
                version=e.version,
                valid=True,
                format=e.card.format,
                space=e.card.space,
                compatible_with=e.card.compatible_with,
                adapter_of=e.card.adapter_of,
                embedding_dim=e.card.embedding_dim,
                classes=e.card.classes,
                active=bool(active and active.version == e.version),
                can_activate=problem is None,
                reason=problem,
                lineage=line,
                generation=len(line) + 1,
                transforms_from=[t.source for t in list_transforms(e.path)],
            )
        )
    space = swap.serving_space()
    counts = gallery.counts_in_space(space) if space is not None else {}
    return ModelsResponse(
        active=active.version if active else None,
        models=out,
        gallery=GalleryGenerations(
            space=space,
            items=gallery.count(),
            generations=counts,
            generation_of={v: len(lineage(v, parents)) + 1 for v in counts},
        ),
    )


@router.get("/active", response_model=ActiveResponse, responses={503: {"model": ErrorResponse}})
def active_model(swap: SwapDep) -> ActiveResponse:
    a = swap.require_active()
    card = a.card.model_dump(mode="json")
    return ActiveResponse(
        version=a.version,
        space=a.space,
        activated_at=a.activated_at,
        card={k: card[k] for k in PUBLIC_CARD_KEYS if k in card},
    )


def _done(metrics: Metrics, r: ActivationResult, gallery: Gallery) -> ActivationResponse:
    metrics.activations.labels(version=r.version, outcome="ok").inc()
    metrics.set_active(r.version, r.space)
    note = rollback_note(gallery, r.version, r.previous)
    return ActivationResponse(
        active=r.version,
        previous=r.previous,
        space=r.space,
        seconds=round(r.seconds, 4),
        rollback=RollbackNote(note=note[0], backfill_report=note[1]) if note else None,
        check=r.check,
        forced=r.forced,
    )


@router.post(
    "/{version}/activate",
    response_model=ActivationResponse,
    dependencies=WRITE,
    responses={409: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
    summary="Hot-swap to a version (refused with 409 if its embeddings are incompatible with the gallery, "
    "by space or by the measured check)",
)
async def activate(
    version: Version,
    swap: SwapDep,
    metrics: MetricsDep,
    gallery: GalleryDep,
    force: bool = Query(False, description="activate even if the measured check fails (recorded)"),
) -> ActivationResponse:
    try:
        result = await run_in_threadpool(lambda: swap.activate(version, force=force))
    except IncompatibleModel:
        metrics.activations.labels(version=version, outcome="refused").inc()
        raise
    return _done(metrics, result, gallery)


@router.post(
    "/rollback",
    response_model=ActivationResponse,
    dependencies=WRITE,
    responses={409: {"model": ErrorResponse}},
    summary="Re-activate the version active before this one",
)
async def rollback(swap: SwapDep, metrics: MetricsDep, gallery: GalleryDep) -> ActivationResponse:
    try:
        result = await run_in_threadpool(swap.rollback)
    except (
        IncompatibleModel
    ) as e:  # say which items the previous space lacks, and the backfill that adds them
        raise await run_in_threadpool(rollback_refusal, gallery, e) from None
    return _done(metrics, result, gallery)


@router.post(
    "/{version}/check",
    dependencies=WRITE,
    responses={404: {"model": ErrorResponse}},
    summary="Measure a candidate against the gallery as stored (overlap with the active model's results, "
    "and with labels: top-1, top-5, mAP, flip rates), as activation will",
)
async def check(version: Version, swap: SwapDep) -> dict[str, Any]:
    return await run_in_threadpool(swap.measure, version)


@router.get(
    "/activations",
    response_model=ActivationsResponse,
    summary="Every activation, oldest first: rollbacks, overrides of a failed check",
)
def activations(gallery: GalleryDep) -> ActivationsResponse:
    return ActivationsResponse(
        activations=[
            ActivationRecord(**{k: r.get(k) for k in ActivationRecord.model_fields if k in r})
            for r in gallery.activation_log()
        ]
    )


class ShadowRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(
        0.1, gt=0, le=1, description="share of live image searches the candidate also answers"
    )


@router.post(
    "/{version}/shadow",
    dependencies=WRITE,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
    summary="Let a candidate also answer a fraction of live image searches, for comparison only "
    "(clients are answered by the active model)",
)
async def shadow_start(
    version: Version, shadow: ShadowDep, body: ShadowRequest | None = None
) -> dict[str, Any]:
    return await run_in_threadpool(shadow.start, version, (body or ShadowRequest()).fraction)


@router.get(
    "/{version}/shadow",
    responses={404: {"model": ErrorResponse}},
    summary="The running shadow comparison: overlap@10 with the active answers, lost top-1, latency",
)
def shadow_status(version: Version, shadow: ShadowDep) -> dict[str, Any]:
    return shadow.status(version)


@router.delete(
    "/{version}/shadow",
    dependencies=WRITE,
    responses={404: {"model": ErrorResponse}},
    summary="End a shadow; answers its final comparison",
)
def shadow_stop(version: Version, shadow: ShadowDep) -> dict[str, Any]:
    return shadow.stop(version)
