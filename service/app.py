"""The FastAPI app: ``create_app(settings)`` with a lifespan that opens the gallery and loads the model."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from index import errors as ierr
from service import errors as serr
from service.routes._body import validation_message
from service.settings import Settings
from trainer.errors import ModelCardError

log = logging.getLogger(__name__)

# Domain error -> HTTP status. Order matters: the first matching class wins (subclasses first).
_STATUS: list[tuple[type[Exception], int]] = [
    (serr.TooLarge, 413),
    (serr.BadImage, 422),
    (serr.BadRequest, 422),
    (serr.ModelNotFound, 404),
    (serr.InvalidModel, 422),
    (serr.IncompatibleModel, 409),
    (serr.NothingToRollBack, 409),
    (serr.BackfillConflict, 409),
    (serr.NoActiveModel, 503),
    (ModelCardError, 422),
    (ierr.DuplicateIds, 409),
    (ierr.UnknownBackfillJob, 404),
    (ierr.InvalidInput, 422),
    (ierr.ItemNotFound, 404),
    (ierr.UnknownVersion, 404),
    (ierr.UnknownSpace, 404),
    (ierr.SpaceMismatch, 409),
    (ierr.VersionConflict, 409),
    (ierr.GalleryClosed, 503),
    (serr.Overloaded, 503),
    (serr.RequestTimeout, 504),
]


def _status_of(exc: Exception) -> int:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return 500


def _install_error_handlers(app: FastAPI) -> None:
    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        code = _status_of(exc)
        body: dict = {"detail": str(exc)}
        if isinstance(exc, serr.IncompatibleModel) and exc.candidate:
            body["backfill_report"] = f"/v1/backfill/report?candidate={exc.candidate}"
        if isinstance(exc, ierr.DuplicateIds) and "inside one batch" in str(exc):
            code = 422
        return JSONResponse(body, status_code=code)

    for cls in (serr.ServiceError, ierr.GalleryError, ModelCardError):
        app.add_exception_handler(cls, domain_error)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"detail": "malformed JSON body"}, status_code=422)
        return JSONResponse({"detail": validation_message(errors)}, status_code=422)

    app.add_exception_handler(RequestValidationError, validation_error)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail else "error"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app.add_exception_handler(StarletteHTTPException, http_error)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)

    app.add_exception_handler(Exception, unexpected)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Nothing heavy happens here: the lifespan opens the gallery and loads the model."""
    settings = settings or Settings()
    from service.observability import Metrics, MetricsMiddleware

    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from index import Gallery
        from service.blobs import BlobStore
        from service.cost import ThroughputProbe
        from service.registry import ModelRegistry
        from service.state import AppState

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        gallery = Gallery.open(settings.resolved_database_url(), settings.data_dir, settings.index_factory,
                               index_params=settings.index_params, faiss_threads=settings.faiss_threads,
                               background_builds=settings.index_background_build,
                               recall_sample=settings.index_recall_sample)
        try:
            registry = ModelRegistry(settings.models_dir, gallery, torch_threads=settings.torch_threads)
            registry.scan()
            state = AppState(settings=settings, gallery=gallery, registry=registry,
                             blobs=BlobStore(settings.data_dir / "blobs"),
                             probe=ThroughputProbe(settings.throughput_probe_images, settings.cpu_threads),
                             metrics=metrics)
            app.state.graceful = state
            from service.hot_paths import start_hot_paths

            stop_hot_paths = start_hot_paths(state)
            try:
                restored = registry.restore(settings.active_model)
                if restored:
                    metrics.set_active(restored.version, restored.space)
                    log.info("serving %s (space %s)", restored.version, restored.space)
            except serr.ServiceError as e:
                log.error("could not activate a model at start-up: %s", e)
            from service.backfill_runner import start_runner

            state.backfill = start_runner(state)  # resumes the jobs a previous process left running
            try:
                yield
            finally:
                stop_hot_paths()  # queued requests finish before the gallery closes
        finally:
            from service.backfill_runner import stop_runner

            stop_runner(getattr(app.state, "graceful", None))  # the batch in flight commits first
            gallery.close()

    app = FastAPI(title="graceful", version="0.1.0", lifespan=lifespan,
                  description="Backward-compatible embedding retrieval: upgrade the model, keep the gallery.")
    _install_error_handlers(app)
    from service.routes import backfill, health, index, items, models, search

    for r in (items.router, search.router, models.router, backfill.router, health.router, index.router):
        app.include_router(r)
    from service.limits import BodyLimitMiddleware

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
