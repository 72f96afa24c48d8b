"""Settings of the service: one pydantic-settings object, read from ``GRACEFUL_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the service reads from its environment (prefix ``GRACEFUL_``, e.g. ``GRACEFUL_MODELS_DIR``)."""

    model_config = SettingsConfigDict(env_prefix="GRACEFUL_", extra="ignore")

    models_dir: Path = Field(
        Path("models"), description="model version folders; the folder name is the version"
    )
    data_dir: Path = Field(Path("data"), description="index snapshots, item sources, the SQLite file")
    index_dir: Path | None = Field(
        None,
        description="FAISS index snapshots (unset: <data_dir>/index); replicas sharing a data_dir each "
        "need their own",
    )
    follow_interval_s: float = Field(
        0.2,
        ge=0,
        le=60,
        description="how often this process applies what other replicas on the same database wrote and "
        "activated (0: never; a lone server loses nothing by it: one cheap query per poll)",
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; unset = SQLite at <data_dir>/gallery.db"
    )
    api_key: SecretStr | None = Field(
        None, description="required in X-API-Key by mutating endpoints when set"
    )
    active_model: str | None = Field(
        None, description="version to activate on first start when none is persisted"
    )
    price_per_cpu_hour: float = Field(
        0.05, ge=0, description="USD per CPU-hour, for the backfill-cost report"
    )

    index_factory: str = Field(
        "Flat", description="FAISS factory string per space: Flat, HNSW32, IVF1024,Flat"
    )
    index_params: str | None = Field(
        None, description="FAISS search parameters, e.g. efSearch=128 or nprobe=32"
    )

    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0, description="largest request body accepted")
    max_batch_items: int = Field(1024, gt=0, description="most items in one ingest request")
    max_image_pixels: int = Field(
        1024 * 1024,
        gt=0,
        description="images decoding to more pixels than this are refused (a JPEG counts at its "
        "reduced decode: a 12-megapixel photo for a 28x28 model decodes at 1/8 size; other formats count "
        "their full size)",
    )
    image_strict_size: bool = Field(
        False,
        description="refuse images not exactly the model's input size (true), instead of resizing them "
        "by the model card's contract (false)",
    )
    max_k: int = Field(1000, gt=0, description="largest k a search may ask for")

    torch_threads: int | None = Field(
        1,
        ge=0,
        description="threads per model forward (0: all cores); 1 leaves a "
        "core to HTTP while batches are embedded (BENCHMARKS.md)",
    )
    faiss_threads: int | None = Field(1, ge=1, description="OpenMP threads per FAISS search")
    model_cache_size: int = Field(
        2,
        ge=0,
        le=16,
        description="loaded model versions kept besides the active one "
        "(backfill candidates, the rollback target)",
    )
    throughput_probe_images: int = Field(
        512, gt=0, description="images in the timed batch of the cost report"
    )

    check_sample: int = Field(
        1000,
        ge=0,
        le=100_000,
        description="gallery items whose sources the compatibility "
        "check embeds with the candidate and the active model (0: no check, the card decides)",
    )
    check_label_key: str = Field(
        "label",
        min_length=1,
        max_length=128,
        description="metadata key holding an item's class, for the check's labelled figures",
    )
    check_tolerance: float = Field(
        0.01,
        ge=0,
        le=1,
        description="how much lower top-1 / mAP than the active "
        "model's a candidate may measure and still activate",
    )
    check_min_overlap_gain: float = Field(
        0.2,
        ge=0,
        le=1,
        description="without labels: overlap@10 a candidate needs above its random baseline's",
    )
    check_max_gallery: int = Field(
        200_000, gt=1, description="stored items the check ranks in full (a seeded subsample above)"
    )
    shadow_max_queue: int = Field(
        64,
        ge=1,
        le=4096,
        description="shadow queries waiting for the candidate; more are dropped (live searches come first)",
    )
    keep_sources: bool = Field(
        True, description="keep ingested image bytes so items can be re-embedded later"
    )
    export_max_sample: int = Field(
        50_000,
        ge=1,
        description="most kept sources one GET /v1/gallery/sources/export may sample (each is read into "
        "a temporary zip file before it is sent)",
    )
    backfill_batch_size: int = Field(
        256, gt=0, le=4096, description="items per backfill transaction (default)"
    )
    backfill_rate_limit: float | None = Field(
        None,
        gt=0,
        description="items/s cap of backfill jobs that set none (unset: as fast as the CPU allows)",
    )
    backfill_lease_s: float = Field(
        15.0,
        gt=0,
        description="seconds a replica's lease on a running backfill job lasts unless renewed (several "
        "replicas on one database: another takes the job over once it runs out)",
    )
    ray_workers: int = Field(
        2, ge=1, le=1024, description="actors of a Ray backfill job (engine ray) that names none"
    )
    ray_address: str | None = Field(
        None,
        description="the Ray cluster of Ray backfill jobs that name none (unset: a local cluster the server "
        "starts); its workers must see the models dir and the data dir at the same paths",
    )
    ray_allowed_addresses: str = Field(
        "",
        description="comma-separated further Ray clusters a backfill request may name in `address` (the "
        "server unpickles what a cluster sends back: list only clusters you trust)",
    )
    backfill_curve_sample: int = Field(
        1000,
        ge=0,
        description="gallery items sampled to simulate the backfill "
        "report's quality curve (0: use the model card)",
    )

    # Hot-path performance and limits (README, "Performance settings and limits").
    batch_max_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="longest a batch waits for more requests that are on their way"
    )
    batch_max_size: int = Field(32, gt=0, le=4096, description="most search requests in one model forward")
    ingest_batch_max_items: int = Field(1024, gt=0, description="most images in one grouped ingest forward")
    batch_max_queue: int = Field(
        1024, gt=0, description="requests waiting per queue before 503 (backpressure)"
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="a request not answered within this gets 503/504"
    )
    # Connections of `graceful serve` (service/console/connections.py says what bounds them).
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="a connection that has not sent a "
        "request's complete headers this long after it opened (or after the "
        "request's first byte) is closed",
    )
    http_body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="a request whose body has not fully "
        "arrived this long after its headers gets 408 and its connection closes",
    )
    http_timeout_keep_alive_s: int = Field(
        5, ge=1, le=3600, description="an idle keep-alive connection is closed after this"
    )
    http_limit_concurrency: int | None = Field(
        1024,
        gt=0,
        description="open connections or requests in flight "
        "past which new requests get 503 (unset: no limit)",
    )
    index_background_build: bool = Field(
        True,
        description="build approximate indexes (HNSW, IVF) off to the side, served by exact search meanwhile",
    )
    index_recall_sample: int = Field(
        1000, ge=0, description="queries sampled to measure recall@k at build time"
    )

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'gallery.db').resolve()}"

    @property
    def cpu_threads(self) -> int:
        return self.torch_threads or os.cpu_count() or 1
