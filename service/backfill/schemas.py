"""Request and response bodies of the backfill-job endpoints (pydantic), separate from the SQL tables."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Policy = Literal["sequential", "uncertainty"]
MAX_BATCH = 4096


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackfillRequest(_Strict):
    candidate: str = Field(min_length=1, max_length=128, description="the version that re-embeds the gallery")
    policy: Policy = Field(
        "sequential", description="order: by item id, or least confident old embeddings first"
    )
    rate_limit: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="items/s cap (unset: the service's default, else none)"
    )
    batch_size: int | None = Field(
        None, ge=1, le=MAX_BATCH, description="items per transaction (unset: default)"
    )
    stop_at: float | None = Field(
        None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="pause by itself once this share of the gallery is embedded by the candidate",
    )


class ResumeRequest(_Strict):
    stop_at: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, description="a new stop point (unset: run to the end)"
    )
    rate_limit: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="a new items/s cap (unset: keep the job's)"
    )


class SkippedItem(BaseModel):
    external_id: str
    reason: str


class BackfillJobResponse(BaseModel):
    id: int
    candidate: str
    space: str
    status: str = Field(
        description="pending, running, paused, cancelled, done or failed (also when every item "
        "it had to re-embed was skipped: then error says so)"
    )
    phase: str | None = Field(None, description="while running: ordering or embedding")
    policy: Policy
    rate_limit: float | None
    batch_size: int
    stop_at: float | None
    done: int = Field(description="items embedded by the candidate in its space (counted in SQL)")
    total: int = Field(description="items in the gallery")
    skipped: int = Field(description="items this job cannot re-embed (no kept source, unreadable source)")
    skipped_examples: list[SkippedItem] = Field(default_factory=list)
    fraction: float = Field(description="done / total")
    rate: float | None = Field(None, description="items/s over the last seconds of work (null when idle)")
    eta_seconds: float | None = None
    reembedded: int = Field(0, description="items this job re-embedded since the service started")
    active_seconds: float = Field(0.0, description="seconds spent running since the service started")
    ordering_seconds: float | None = Field(None, description="time taken to compute the order (uncertainty)")
    seconds_by_stage: dict[str, float] = Field(
        default_factory=dict,
        description="time spent per stage of the "
        "batches (list, read_decode, embed, write) since the service started",
    )
    can_activate: bool | None = Field(None, description="the candidate may now serve over the gallery")
    error: str | None = None
    created_at: str
    updated_at: str


class BackfillJobsResponse(BaseModel):
    jobs: list[BackfillJobResponse]
