"""Request and response bodies of the backfill-job endpoints (pydantic), separate from the SQL tables."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Policy = Literal["sequential", "uncertainty"]
Engine = Literal["local", "ray"]
Kind = Literal["image", "transform"]
MAX_BATCH = 4096


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackfillRequest(_Strict):
    candidate: str = Field(min_length=1, max_length=128, description="the version that re-embeds the gallery")
    kind: Kind = Field(
        "image",
        description="image: re-embed each item's kept source with the candidate; transform: write the "
        "candidate's space from the stored vectors of `source`'s space through the transform fitted between "
        "them (`graceful transform`), reading no source (seconds per million items)",
    )
    source: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="kind transform: the version whose stored vectors are mapped (unset: the active one)",
    )
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
    engine: Engine = Field(
        "local",
        description="where items are embedded: this server's thread (local), or a Ray Data actor pool (ray; "
        "needs `pip install graceful[ray]`); either way the server writes them, exactly once",
    )
    address: str | None = Field(
        None,
        min_length=1,
        max_length=512,
        description="engine ray: the cluster to connect to (unset: the server's, GRACEFUL_RAY_ADDRESS, else a "
        "local cluster it starts); only the server's own or one in GRACEFUL_RAY_ALLOWED_ADDRESSES",
    )
    workers: int | None = Field(
        None, ge=1, le=1024, description="engine ray: actors embedding (unset: GRACEFUL_RAY_WORKERS)"
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
    phase: str | None = Field(None, description="while running: ordering, embedding or transforming")
    kind: Kind = Field("image", description="image (re-embeds sources) or transform (maps stored vectors)")
    source: str | None = Field(None, description="kind transform: the version whose stored vectors it maps")
    policy: Policy
    rate_limit: float | None
    batch_size: int
    stop_at: float | None
    engine: Engine = Field("local", description="local (this server's thread) or ray (a Ray Data actor pool)")
    workers: int | None = Field(None, description="engine ray: actors embedding")
    owner: str | None = Field(
        None, description="the replica (host:pid:id) holding the job's lease while it runs; null otherwise"
    )
    done: int = Field(
        description="items done in the candidate's space (counted in SQL): embedded by the candidate (kind "
        "image), or embedded or transformed (kind transform)"
    )
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
