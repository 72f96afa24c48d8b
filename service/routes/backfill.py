"""The backfill-cost report (and, later, backfill jobs)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from service.cost import backfill_report
from service.state import State

router = APIRouter(prefix="/v1/backfill", tags=["backfill"])


@router.get("/report", summary="What re-embedding the gallery with a candidate would cost, and what it buys")
async def report(state: State, candidate: str = Query(min_length=1, max_length=128)) -> dict[str, Any]:
    return await run_in_threadpool(backfill_report, state.registry, state.probe, candidate,
                                   state.settings.price_per_cpu_hour)
