"""Backfill: the cost report, and jobs that re-embed the gallery with a candidate while serving."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.concurrency import run_in_threadpool

from service.api.auth import WRITE
from service.api.deps import BackfillDep, CostsDep, GalleryDep
from service.backfill.runner import BackfillRunner
from service.backfill.schemas import BackfillJobResponse, BackfillJobsResponse, BackfillRequest, ResumeRequest
from service.schemas import ErrorResponse

router = APIRouter(prefix="/v1/backfill", tags=["backfill"])

_ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}}
# a 64-bit SQL id: larger values would overflow the database driver (500) instead of a 422 (found by fuzzing)
JobId = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.get(
    "/report",
    summary="What re-embedding the gallery with a candidate would cost, and what each fraction of it buys",
)
async def report(
    costs: CostsDep,
    candidate: str = Query(min_length=1, max_length=128),
    rate_limit: float | None = Query(None, gt=0, description="items/s cap the times assume"),
    workers: int = Query(
        1, ge=1, le=1024, description="workers the times assume: the measured single-worker rate x N"
    ),
) -> dict[str, Any]:
    return await run_in_threadpool(costs.report, candidate, rate_limit, workers)


def _job(runner: BackfillRunner, job_id: int) -> BackfillJobResponse:
    return BackfillJobResponse(**runner.describe(job_id))


@router.post(
    "",
    response_model=BackfillJobResponse,
    status_code=202,
    dependencies=WRITE,
    responses=_ERRORS,
    summary="Start re-embedding the gallery with a candidate version, in the background",
)
def start(body: BackfillRequest, runner: BackfillDep) -> BackfillJobResponse:
    job = runner.create(
        body.candidate,
        body.policy,
        rate_limit=body.rate_limit,
        batch_size=body.batch_size,
        stop_at=body.stop_at,
        engine=body.engine,
        address=body.address,
        workers=body.workers,
        kind=body.kind,
        source=body.source,
    )
    return _job(runner, job.id)


@router.get("", response_model=BackfillJobsResponse, summary="Every backfill job, oldest first")
def list_jobs(
    runner: BackfillDep, gallery: GalleryDep, candidate: str | None = Query(None, max_length=128)
) -> BackfillJobsResponse:
    return BackfillJobsResponse(
        jobs=[BackfillJobResponse(**runner.describe(j)) for j in gallery.backfill.list_jobs(candidate)]
    )


@router.get(
    "/{job_id}",
    response_model=BackfillJobResponse,
    responses=_ERRORS,
    summary="A job's status, progress (done/total), rate and ETA",
)
def get_job(job_id: JobId, runner: BackfillDep) -> BackfillJobResponse:
    return _job(runner, job_id)


@router.post(
    "/{job_id}/pause",
    response_model=BackfillJobResponse,
    dependencies=WRITE,
    responses=_ERRORS,
    summary="Pause a job after the batch in flight",
)
def pause(job_id: JobId, runner: BackfillDep) -> BackfillJobResponse:
    runner.pause(job_id)
    return _job(runner, job_id)


@router.post(
    "/{job_id}/resume",
    response_model=BackfillJobResponse,
    dependencies=WRITE,
    responses=_ERRORS,
    summary="Resume a paused job (optionally with a new stop point or rate limit)",
)
def resume(job_id: JobId, runner: BackfillDep, body: ResumeRequest | None = None) -> BackfillJobResponse:
    body = body or ResumeRequest()
    runner.resume(job_id, stop_at=body.stop_at, rate_limit=body.rate_limit)
    return _job(runner, job_id)


@router.post(
    "/{job_id}/cancel",
    response_model=BackfillJobResponse,
    dependencies=WRITE,
    responses=_ERRORS,
    summary="Stop a job for good (what it re-embedded stays)",
)
def cancel(job_id: JobId, runner: BackfillDep) -> BackfillJobResponse:
    runner.cancel(job_id)
    return _job(runner, job_id)
