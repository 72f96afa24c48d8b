"""The page a person uses (``/``), its static files (``/static``), API docs that need no internet (Swagger UI
at ``/docs``, ReDoc at ``/redoc``), and the one read the page needs that ``GET /v1/models`` does not give: a
model's public card.

The page is plain HTML/JS/CSS in ``service/static/`` (no build step, nothing from a CDN): it only calls the
public API, so everything it shows a client can get too. Swagger UI's files come from the ``fastapi-offline``
package (a Python dependency that ships swagger-ui-dist and ReDoc), served under ``/static/swagger``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.api.deps import RegistryDep
from service.api.routes.models import PUBLIC_CARD_KEYS, Version
from service.errors import InvalidModel, ModelNotFound
from service.schemas import ErrorResponse

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
SWAGGER_DIR = Path(str(files("fastapi_offline") / "static"))

# The page loads only its own files and the API's images: a stray CDN reference would fail, not leak.
_PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter()


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html",
        headers={"Content-Security-Policy": _PAGE_CSP, "Cache-Control": "no-cache"},
    )


@router.get(
    "/v1/models/{version}/card",
    tags=["models"],
    responses={404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    summary="A version's public card: lineage, classes, preprocessing and its compatibility matrix",
)
def model_card(version: Version, registry: RegistryDep) -> dict[str, Any]:
    entry = next((e for e in registry.survey() if e.version == version), None)  # reads, writes nothing
    if entry is None:
        raise ModelNotFound(f"no model version {version[:200]!r} in the models dir")
    if entry.card is None:
        raise InvalidModel(entry.error or f"model folder {version!r} is refused")
    card = entry.card.model_dump(mode="json")
    return {k: card[k] for k in PUBLIC_CARD_KEYS if k in card}


def install(app: FastAPI) -> None:
    """Add the page, its static files, and Swagger UI (``/docs``) and ReDoc (``/redoc``) from local files to
    ``app`` (built with ``docs_url=None, redoc_url=None``)."""
    app.include_router(router)
    # the more specific mount first: Starlette takes the first that matches
    app.mount("/static/swagger", StaticFiles(directory=SWAGGER_DIR), name="swagger")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    oauth2_redirect = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{oauth2_redirect}",
            swagger_js_url=f"{root}/static/swagger/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/static/swagger/swagger-ui.css",
            swagger_favicon_url=f"{root}/static/swagger/favicon.png",
            # no badge fetched from swagger.io's online validator
            swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None},
        )

    @app.get(oauth2_redirect, include_in_schema=False)
    def docs_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}/static/swagger/redoc.standalone.js",
            redoc_favicon_url=f"{root}/static/swagger/favicon.png",
            with_google_fonts=False,
        )
