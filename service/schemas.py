"""Request and response bodies of the HTTP API (pydantic), separate from the SQL tables."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


MAX_EXTERNAL_ID = 256
# An item is fetched and deleted at /v1/items/{external_id}: an id with '/' would be stored but never reached.
EXTERNAL_ID_PATTERN = r"^[^/]+$"


def external_id_problem(eid: str) -> str | None:
    """Why ``eid`` cannot be an item's external id, or None."""
    if not 1 <= len(eid) <= MAX_EXTERNAL_ID:
        return f"external id must be 1-{MAX_EXTERNAL_ID} characters"
    if "/" in eid:
        return (f"external id {eid[:80]!r} contains '/': items are read and deleted at /v1/items/{{external_id}}, "
                "so ids may not contain '/'")
    return None


class IngestItem(_Strict):
    external_id: str = Field(min_length=1, max_length=MAX_EXTERNAL_ID,
                             json_schema_extra={"pattern": EXTERNAL_ID_PATTERN})
    image_base64: str = Field(min_length=1)
    metadata: dict[str, Any] | None = None

    @field_validator("external_id")
    @classmethod
    def _reachable(cls, v: str) -> str:
        problem = external_id_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class IngestRequest(_Strict):
    items: list[IngestItem]
    upsert: bool = Field(False, description="replace items that exist instead of refusing them")


class IngestResponse(BaseModel):
    model_version: str
    space: str
    stored: list[str]
    count: int


class ItemResponse(BaseModel):
    external_id: str
    metadata: dict[str, Any] | None
    embedded_by: dict[str, str] = Field(description="space -> the version that embedded the item there")
    has_source: bool = Field(description="its raw bytes are kept, so it can be re-embedded")
    created_at: str
    updated_at: str


class DeleteResponse(BaseModel):
    deleted: str


class SearchRequest(_Strict):
    """Exactly one of ``image_base64``, ``vector`` (with ``model_version``) or ``item_id``."""

    image_base64: str | None = None
    vector: list[float] | None = None
    model_version: str | None = None
    item_id: str | None = None
    k: int = Field(10, ge=1)
    include_metadata: bool = Field(True, description="false skips the metadata lookup (faster for large k)")


class SearchHit(BaseModel):
    external_id: str
    score: float
    embedded_by: str
    metadata: dict[str, Any] | None = None


class SearchResponse(BaseModel):
    model_version: str = Field(description="the version that embedded the query")
    space: str
    hits: list[SearchHit]


class ModelInfo(BaseModel):
    version: str
    valid: bool
    error: str | None = None
    space: str | None = None
    compatible_with: str | None = None
    adapter_of: str | None = None
    embedding_dim: int | None = None
    classes: list[int] | None = None
    active: bool = False
    can_activate: bool | None = None
    reason: str | None = None


class ModelsResponse(BaseModel):
    active: str | None
    models: list[ModelInfo]


class ActiveResponse(BaseModel):
    version: str
    space: str
    activated_at: float
    card: dict[str, Any]


class RollbackNote(BaseModel):
    note: str = Field(description="what a rollback to the previous version will need once items are ingested")
    backfill_report: str = Field(description="what re-embedding with the previous version costs")


class ActivationResponse(BaseModel):
    active: str
    previous: str | None
    space: str
    seconds: float
    rollback: RollbackNote | None = Field(None, description="set when the swap changed the embedding space: a "
                                          "rollback will need a backfill of the items ingested from now on")


class ErrorResponse(BaseModel):
    detail: str


class IndexBuild(BaseModel):
    """A finished build of an approximate index and its measured quality."""

    factory: str
    params: str | None
    reason: str
    vectors: int = Field(description="vectors in the index when it was built")
    seconds: float = Field(description="wall time of the build (read SQL, train, add, measure)")
    replayed: int = Field(description="writes that landed during the build, replayed onto it")
    recall: float | None = Field(description="recall@k against exact search on `sample` stored vectors as "
                                             "queries (each query left out of both answers)")
    k: int
    sample: int
    finished_at: float


class SpaceIndexInfo(BaseModel):
    space: str
    dim: int
    factory: str = Field(description="the configured FAISS factory (GRACEFUL_INDEX_FACTORY)")
    built_factory: str = Field(description="what serves now: the factory, or Flat while it is being built")
    exact: bool = Field(description="searches are exact (Flat) right now")
    recall: float | None = Field(description="recall@10 of the serving index vs exact: 1.0 when exact, the "
                                             "last build's measure otherwise (null if never measured)")
    live: int
    tombstones: int
    params: str | None
    building: dict[str, Any] | None = Field(description="the build in progress: reason, started_at, done, total")
    last_build: IndexBuild | None


class IndexResponse(BaseModel):
    spaces: list[SpaceIndexInfo]


class RebuildResponse(BaseModel):
    space: str
    started: bool = Field(description="false when a build of this space is already running")
