"""Request and response bodies of the HTTP API (pydantic), separate from the SQL tables."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
        return (
            f"external id {eid[:80]!r} contains '/': items are read and deleted at /v1/items/{{external_id}}, "
            "so ids may not contain '/'"
        )
    return None


MAX_VECTOR_DIM = (
    65536  # longest vector an item may carry (the body bound, GRACEFUL_MAX_BODY_BYTES, comes first)
)
# Numbers only (no strings, no booleans), finite: a NaN or inf is refused naming its position.
VectorValue = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class IngestItem(_Strict):
    """An image (embedded by the active version), or a vector computed outside graceful with the version
    that made it (``model_version``: the active version, or another of the space the gallery serves)."""

    external_id: str = Field(
        min_length=1, max_length=MAX_EXTERNAL_ID, json_schema_extra={"pattern": EXTERNAL_ID_PATTERN}
    )
    image_base64: str | None = Field(None, min_length=1)
    vector: list[VectorValue] | None = Field(
        None,
        min_length=1,
        max_length=MAX_VECTOR_DIM,
        description="the item's embedding by `model_version` (L2-normalised on input; a zero vector is refused)",
    )
    model_version: str | None = Field(
        None, min_length=1, max_length=128, description="the version that computed `vector`"
    )
    metadata: dict[str, Any] | None = None

    @field_validator("external_id")
    @classmethod
    def _reachable(cls, v: str) -> str:
        problem = external_id_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _image_or_vector(self) -> IngestItem:
        if (self.image_base64 is None) == (self.vector is None):
            raise ValueError("give exactly one of image_base64 or vector (with model_version)")
        if self.vector is not None and self.model_version is None:
            raise ValueError("a vector needs model_version: the version that computed it")
        if self.image_base64 is not None and self.model_version is not None:
            raise ValueError("model_version goes with a vector; an image is embedded by the active version")
        return self


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


# Metadata filters of a search (index.filters.MetadataFilter checks the same, and names what is wrong).
FILTER_DESCRIPTION = (
    'only items whose metadata matches: {"key": value} (equal) or {"key": {"in": [values]}} (any of them), '
    "on top-level keys, every key must match; values are strings, numbers or booleans of the same JSON kind "
    '("3" does not match 3, true does not match 1)'
)
FilterScalar = (
    Annotated[str, Field(max_length=1024)]
    | Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
    | Annotated[float, Field(allow_inf_nan=False)]
    | bool
)
FilterKey = Annotated[str, Field(min_length=1, max_length=128)]


class InFilter(_Strict):
    """``{"in": [values]}``: the key's value is one of these."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    values: list[FilterScalar] = Field(alias="in", min_length=1, max_length=256)


FilterBody = dict[FilterKey, FilterScalar | InFilter]


def filter_spec(body: FilterBody | None) -> dict[str, Any] | None:
    """The JSON form of a parsed filter (what :meth:`index.filters.MetadataFilter.parse` takes)."""
    if body is None:
        return None
    return {k: {"in": list(v.values)} if isinstance(v, InFilter) else v for k, v in body.items()}


class SearchRequest(_Strict):
    """Exactly one of ``image_base64``, ``vector`` (with ``model_version``) or ``item_id``."""

    image_base64: str | None = None
    vector: list[float] | None = None
    model_version: str | None = None
    item_id: str | None = None
    k: int = Field(10, ge=1)
    include_metadata: bool = Field(True, description="false skips the metadata lookup (faster for large k)")
    filter: FilterBody | None = Field(None, max_length=16, description=FILTER_DESCRIPTION)


MAX_BATCH_SEARCHES = 64


class BatchSearchRequest(_Strict):
    searches: list[SearchRequest] = Field(
        min_length=1,
        max_length=MAX_BATCH_SEARCHES,
        description=f"1-{MAX_BATCH_SEARCHES} search bodies, answered in order",
    )


class SearchHit(BaseModel):
    external_id: str
    score: float
    embedded_by: str
    route: str = Field(
        "model",
        description="how the hit's vector was produced: model (embedded_by embedded its source) or transform "
        "(a learned map of its stored vector in an older space; an image backfill replaces it)",
    )
    metadata: dict[str, Any] | None = None


class SearchResponse(BaseModel):
    model_version: str = Field(description="the version that embedded the query")
    space: str
    hits: list[SearchHit]


class BatchSearchResponse(BaseModel):
    results: list[SearchResponse] = Field(description="one answer per search, in the order asked")


MAX_IDS_PER_REQUEST = 1000
ExternalIdRef = Annotated[str, Field(min_length=1, max_length=512)]


class ItemsPage(BaseModel):
    items: list[ItemResponse]
    next: str | None = Field(description="pass as `after` for the next page; null on the last page")


class ExternalIdsRequest(_Strict):
    external_ids: list[ExternalIdRef] = Field(min_length=1, max_length=MAX_IDS_PER_REQUEST)


class ItemsGetResponse(BaseModel):
    items: list[ItemResponse] = Field(description="the items found, in the order asked")
    missing: list[str] = Field(description="the ids asked for that do not exist")


class ItemsDeleteResponse(BaseModel):
    deleted: list[str] = Field(description="the ids deleted (they existed)")
    missing: list[str] = Field(description="the ids asked for that did not exist (nothing to delete)")


class MetadataPatch(_Strict):
    metadata: dict[str, Any] | None = Field(
        description="merge: keys with null are removed, the others set; replace: the new metadata (null clears it)"
    )
    merge: bool = Field(True, description="merge into the stored metadata (true) or replace it (false)")


class ModelInfo(BaseModel):
    version: str
    valid: bool
    error: str | None = None
    format: str | None = Field(
        None,
        description='"graceful-model/1" (graceful weights), "onnx" (an ONNX export) or "external" (no '
        "weights: it takes vectors computed outside graceful, not images)",
    )
    space: str | None = None
    compatible_with: str | None = None
    adapter_of: str | None = None
    embedding_dim: int | None = None
    classes: list[int] | None = None
    active: bool = False
    can_activate: bool | None = None
    reason: str | None = None
    lineage: list[str] = Field(
        default_factory=list,
        description="the versions this one descends from (compatible_with, then theirs), nearest first",
    )
    generation: int | None = Field(None, description="1 + the length of its lineage")
    transforms_from: list[str] = Field(
        default_factory=list,
        description="versions whose stored vectors it can take by a transform backfill (fitted transforms)",
    )


class GalleryGenerations(BaseModel):
    space: str | None = Field(description="the space searches use (the active model's)")
    items: int
    generations: dict[str, dict[str, int]] = Field(
        description="version -> its items' vectors in that space by route (model, transform)"
    )
    generation_of: dict[str, int] = Field(description="version -> its generation (1 + its lineage's length)")


class ModelsResponse(BaseModel):
    active: str | None
    models: list[ModelInfo]
    gallery: GalleryGenerations | None = Field(
        None, description="which versions (generations) the gallery's items in the serving space come from"
    )


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
    rollback: RollbackNote | None = Field(
        None,
        description="set when the swap changed the embedding space: a "
        "rollback will need a backfill of the items ingested from now on",
    )
    check: dict[str, Any] | None = Field(
        None,
        description="the measured compatibility check the swap rested on "
        "(null: none ran: a rollback, or no active model)",
    )
    forced: bool = Field(False, description="activated with force=true past a failed check")


class ActivationRecord(BaseModel):
    version: str
    at: str
    rollback: bool
    forced: bool = False
    check: dict[str, Any] | None = None


class ActivationsResponse(BaseModel):
    activations: list[ActivationRecord]


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
    recall: float | None = Field(
        description="recall@k against exact search on `sample` stored vectors as "
        "queries (each query left out of both answers)"
    )
    k: int
    sample: int
    finished_at: float


class SpaceIndexInfo(BaseModel):
    space: str
    dim: int
    factory: str = Field(description="the configured FAISS factory (GRACEFUL_INDEX_FACTORY)")
    built_factory: str = Field(description="what serves now: the factory, or Flat while it is being built")
    exact: bool = Field(description="searches are exact (Flat) right now")
    recall: float | None = Field(
        description="recall@10 of the serving index vs exact: 1.0 when exact, the "
        "last build's measure otherwise (null if never measured)"
    )
    live: int
    tombstones: int
    params: str | None
    building: dict[str, Any] | None = Field(
        description="the build in progress: reason, started_at, done, total"
    )
    last_build: IndexBuild | None


class IndexResponse(BaseModel):
    spaces: list[SpaceIndexInfo]


class RebuildResponse(BaseModel):
    space: str
    started: bool = Field(description="false when a build of this space is already running")
