"""The FastAPI app: ``create_app(settings)``; its lifespan is the one place that builds the service's parts.

Parts are built in dependency order (gallery -> registry -> model cache -> hot swap -> serving paths ->
replica follower -> backfill runner -> cost report) into one frozen :class:`~service.parts.Parts`, and
stopped in reverse: queued requests finish, the backfill batch in flight commits, then the gallery writes
its snapshots.
See docs/architecture.md for how a search, an ingest, a hot swap and a backfill flow through them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from service.observability import Metrics
from service.settings import Settings

if TYPE_CHECKING:
    from service.parts import Parts

log = logging.getLogger(__name__)


def build_parts(settings: Settings, metrics: Metrics, stack: AsyncExitStack | None = None) -> Parts:
    """Open the gallery and build every part; registers each part's shutdown on ``stack`` (reverse order)."""
    import torch

    from index import Gallery
    from service.backfill.cost import CostReport, ThroughputProbe
    from service.backfill.curve import CurveCache
    from service.backfill.ray_engine import RayOptions
    from service.backfill.runner import BackfillRunner
    from service.blobs import BlobStore
    from service.errors import ServiceError
    from service.models.cache import ModelCache
    from service.models.check import CheckOptions, CompatibilityCheck
    from service.models.hot_swap import HotSwap
    from service.models.registry import ModelRegistry
    from service.models.transforms import TransformStore
    from service.parts import Parts
    from service.replicas.follower import ReplicaFollower
    from service.serving.batching import BatchBounds
    from service.serving.ingest import IngestPath
    from service.serving.search import SearchPath
    from service.serving.shadow import ShadowTraffic

    s = settings
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    s.data_dir.mkdir(parents=True, exist_ok=True)
    gallery = Gallery.open(
        s.resolved_database_url(),
        s.data_dir,
        s.index_factory,
        index_params=s.index_params,
        faiss_threads=s.faiss_threads,
        background_builds=s.index_background_build,
        recall_sample=s.index_recall_sample,
        index_dir=s.index_dir,
    )
    if stack is not None:
        stack.callback(gallery.close)
    registry = ModelRegistry(s.models_dir, gallery)
    registry.scan()
    models = ModelCache(registry, capacity=s.model_cache_size)
    blobs = BlobStore(s.data_dir / "blobs")
    check = (
        None
        if s.check_sample == 0
        else CompatibilityCheck(
            gallery,
            models,
            blobs,
            CheckOptions(
                sample_size=s.check_sample,
                label_key=s.check_label_key,
                tolerance=s.check_tolerance,
                min_overlap_gain=s.check_min_overlap_gain,
                max_gallery=s.check_max_gallery,
                max_pixels=s.max_image_pixels,
            ),
        )
    )
    swap = HotSwap(registry, models, check)

    def worker_start() -> None:
        # FAISS's OpenMP thread count is per calling thread: setting it once at start-up in the main
        # thread (Gallery.open) does not reach the threads that search.
        if s.faiss_threads:
            import faiss

            faiss.omp_set_num_threads(int(s.faiss_threads))

    wait_s = s.batch_max_wait_ms / 1e3
    shadow = ShadowTraffic(gallery, swap, models, max_queue=s.shadow_max_queue, max_pixels=s.max_image_pixels)
    if stack is not None:
        stack.callback(shadow.close)
    search = SearchPath(
        gallery,
        swap,
        metrics,
        BatchBounds(s.batch_max_size, wait_s, s.batch_max_queue, worker_start),
        max_image_pixels=s.max_image_pixels,
        strict_image_size=s.image_strict_size,
        shadow=shadow,
    )
    ingest = IngestPath(
        gallery,
        swap,
        blobs,
        metrics,
        BatchBounds(s.ingest_batch_max_items, wait_s, s.batch_max_queue, worker_start),
        max_image_pixels=s.max_image_pixels,
        strict_image_size=s.image_strict_size,
        keep_sources=s.keep_sources,
    )
    if stack is not None:  # queued requests finish before the gallery closes
        stack.callback(ingest.close)
        stack.callback(search.close)
    try:
        restored = swap.restore(s.active_model)
        if restored:
            metrics.set_active(restored.version, restored.space)
            log.info("serving %s (space %s)", restored.version, restored.space)
    except ServiceError as e:
        log.error("could not activate a model at start-up: %s", e)

    follower = ReplicaFollower(gallery, swap, metrics, s.follow_interval_s)
    follower.start()
    if stack is not None:
        stack.callback(follower.stop)

    def embedded(version: str, n: int) -> None:
        metrics.embedded.labels(version=version, purpose="backfill").inc(n)

    transforms = TransformStore(registry)
    backfill = BackfillRunner(
        gallery,
        swap,
        models,
        blobs,
        batch_size=s.backfill_batch_size,
        rate_limit=s.backfill_rate_limit,
        max_image_pixels=s.max_image_pixels,
        on_embedded=embedded,
        lease_s=s.backfill_lease_s,
        ray=RayOptions.from_settings(s),
        transforms=transforms,
    )
    backfill.start()  # resumes the jobs a previous process left running
    if stack is not None:  # the batch in flight commits before the gallery closes
        stack.callback(backfill.stop)
    costs = CostReport(
        swap,
        models,
        ThroughputProbe(s.throughput_probe_images, s.cpu_threads),
        blobs=blobs,
        curves=CurveCache(),
        price_per_cpu_hour=s.price_per_cpu_hour,
        sample_size=s.backfill_curve_sample,
        max_pixels=s.max_image_pixels,
        label_key=s.check_label_key,
        transforms=transforms,
    )
    return Parts(
        settings=s,
        metrics=metrics,
        gallery=gallery,
        blobs=blobs,
        registry=registry,
        models=models,
        swap=swap,
        shadow=shadow,
        search=search,
        ingest=ingest,
        backfill=backfill,
        costs=costs,
        follower=follower,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Nothing heavy happens here: the lifespan opens the gallery and loads the model."""
    settings = settings or Settings()
    from service.api.error_handlers import install_error_handlers
    from service.api.limits import BodyLimitMiddleware
    from service.api.routes import (
        backfill,
        export,
        health,
        index,
        item_images,
        items,
        models,
        page,
        search,
    )
    from service.observability import MetricsMiddleware

    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            app.state.parts = build_parts(settings, metrics, stack)
            yield

    app = FastAPI(
        title="graceful",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,  # served from local files by page.install
        description="Backward-compatible embedding retrieval: upgrade the model, keep the gallery.",
    )
    install_error_handlers(app)
    for r in (
        items.router,
        item_images.router,
        export.router,
        search.router,
        models.router,
        backfill.router,
        health.router,
        index.router,
    ):
        app.include_router(r)
    page.install(app)  # the page at /, /static, and /docs and /redoc that need no internet
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.http_body_timeout_s
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
