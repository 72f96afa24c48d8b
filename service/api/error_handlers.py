"""Domain errors to HTTP answers, by type only: the one place that knows status codes.

Each package raises its own typed errors (``service.errors``, ``index.errors``, ``trainer.errors``); the
table below maps each type to a status (the first matching class wins, so subclasses come first). Every
answer is ``{"detail": "..."}``; an unexpected error is logged and answered 500 without its text.
"""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from index import errors as ierr
from service import errors as serr
from service.api.bodies import validation_message
from service.models.hot_swap import backfill_report_url
from trainer import ModelCardError, NoImageModel

log = logging.getLogger(__name__)

STATUS: list[tuple[type[Exception], int]] = [
    (serr.TooLarge, 413),
    (serr.BadImage, 422),
    (serr.BadRequest, 422),
    (serr.ModelNotFound, 404),
    (serr.InvalidModel, 422),
    (serr.IncompatibleModel, 409),
    (serr.NothingToRollBack, 409),
    (serr.BackfillConflict, 409),
    (serr.NoActiveModel, 503),
    (serr.NoShadow, 404),
    (serr.NoSourceKept, 404),
    (serr.NoTransform, 404),
    (serr.NothingToExport, 409),
    (ModelCardError, 422),
    (NoImageModel, 409),  # an image sent to an external version: it takes vectors
    (ierr.RepeatedIds, 422),  # the request contradicts itself: nothing to do with what is stored
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


def status_of(exc: Exception) -> int:
    for cls, code in STATUS:
        if isinstance(exc, cls):
            return code
    return 500


def redact(request: Request, detail: str) -> str:
    """``detail`` without the server's own folders (models dir, data dir): a client learns names, not where
    they live. The registry already words its errors so; this catches any other error quoting a path."""
    parts = getattr(request.app.state, "parts", None)
    if parts is None:
        return detail
    roots: set[str] = set()
    for folder in (parts.settings.models_dir, parts.settings.data_dir):
        roots.update({str(folder.resolve()), str(folder.absolute())})
    for root in sorted(roots, key=len, reverse=True):
        detail = detail.replace(root + os.sep, "").replace(root, "<server folder>")
    return detail


def install_error_handlers(app: FastAPI) -> None:
    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        body: dict = {"detail": redact(request, str(exc))}
        if isinstance(exc, serr.IncompatibleModel) and exc.candidate:
            body["backfill_report"] = backfill_report_url(exc.candidate)
        if isinstance(exc, serr.CheckFailed):
            body["check"] = exc.check
        status = status_of(exc)
        # a body refused for its size (say, too many multipart parts) may still be arriving: close the
        # connection rather than read and drop the rest of it
        return JSONResponse(
            body, status_code=status, headers={"connection": "close"} if status == 413 else None
        )

    for cls in (serr.ServiceError, ierr.GalleryError, ModelCardError, NoImageModel):
        app.add_exception_handler(cls, domain_error)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"detail": "malformed JSON body"}, status_code=422)
        return JSONResponse({"detail": validation_message(errors)}, status_code=422)

    app.add_exception_handler(RequestValidationError, validation_error)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail else "error"
        return JSONResponse(
            {"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    app.add_exception_handler(StarletteHTTPException, http_error)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)

    app.add_exception_handler(Exception, unexpected)
