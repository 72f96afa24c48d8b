"""Backfill: the cost report, and jobs that re-embed the gallery with a candidate while serving."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.concurrency import run_in_threadpool

from service.auth import WRITE
from service.backfill_runner import BackfillRunner
from service.backfill_schemas import BackfillJobResponse, BackfillJobsResponse, BackfillRequest, ResumeRequest
from service.cost import backfill_report
from service.schemas import ErrorResponse
from service.state import AppState, State

router = APIRouter(prefix="/v1/backfill", tags=["backfill"])

_ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}}
# a 64-bit SQL id: larger values would overflow the database driver (500) instead of a 422 (found by fuzzing)
JobId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def _runner(state: AppState) -> BackfillRunner:
    assert state.backfill is not None, "the lifespan starts the backfill runner"
    return state.backfill


@router.get("/report", summary="What re-embedding the gallery with a candidate would cost, and what each "
                               "fraction of it buys")
async def report(state: State, candidate: str = Query(min_length=1, max_length=128),
                 rate_limit: float | None = Query(None, gt=0, description="items/s cap the times assume")
                 ) -> dict[str, Any]:
    return await run_in_threadpool(backfill_report, state.registry, state.probe, candidate,
                                   state.settings.price_per_cpu_hour, blobs=state.blobs,
                                   curves=_runner(state).curves, sample_size=state.settings.backfill_curve_sample,
                                   rate_limit=rate_limit)


def _job(state: AppState, job_id: int) -> BackfillJobResponse:
    return BackfillJobResponse(**_runner(state).describe(job_id))


@router.post("", response_model=BackfillJobResponse, status_code=202, dependencies=WRITE, responses=_ERRORS,
             summary="Start re-embedding the gallery with a candidate version, in the background")
def start(body: BackfillRequest, state: State) -> BackfillJobResponse:
    job = _runner(state).create(body.candidate, body.policy, rate_limit=body.rate_limit,
                                batch_size=body.batch_size, stop_at=body.stop_at)
    return _job(state, job.id)


@router.get("", response_model=BackfillJobsResponse, summary="Every backfill job, oldest first")
def list_jobs(state: State, candidate: str | None = Query(None, max_length=128)) -> BackfillJobsResponse:
    runner = _runner(state)
    return BackfillJobsResponse(jobs=[BackfillJobResponse(**runner.describe(j))
                                      for j in state.gallery.list_backfill_jobs(candidate)])


@router.get("/{job_id}", response_model=BackfillJobResponse, responses=_ERRORS,
            summary="A job's status, progress (done/total), rate and ETA")
def get_job(job_id: JobId, state: State) -> BackfillJobResponse:
    return _job(state, job_id)


@router.post("/{job_id}/pause", response_model=BackfillJobResponse, dependencies=WRITE, responses=_ERRORS,
             summary="Pause a job after the batch in flight")
def pause(job_id: JobId, state: State) -> BackfillJobResponse:
    _runner(state).pause(job_id)
    return _job(state, job_id)


@router.post("/{job_id}/resume", response_model=BackfillJobResponse, dependencies=WRITE, responses=_ERRORS,
             summary="Resume a paused job (optionally with a new stop point or rate limit)")
def resume(job_id: JobId, state: State, body: ResumeRequest | None = None) -> BackfillJobResponse:
    body = body or ResumeRequest()
    _runner(state).resume(job_id, stop_at=body.stop_at, rate_limit=body.rate_limit)
    return _job(state, job_id)


@router.post("/{job_id}/cancel", response_model=BackfillJobResponse, dependencies=WRITE, responses=_ERRORS,
             summary="Stop a job for good (what it re-embedded stays)")
def cancel(job_id: JobId, state: State) -> BackfillJobResponse:
    _runner(state).cancel(job_id)
    return _job(state, job_id)
