"""The API documentation pages, `/docs` (Swagger UI) and `/redoc` (ReDoc), served with their
JavaScript and CSS from the installed `fastapi-offline` package instead of a CDN, so they render
on a machine with no internet access; and the site's favicon at `/favicon.ico`.

Each page carries a Content-Security-Policy as strict as the demo page's (everything from this
origin): Swagger UI's one inline start-up script is allowed by a per-response nonce; ReDoc
writes its styles at run time (styled-components), so its page alone allows inline styles."""

from __future__ import annotations

import secrets
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.errors import ServiceError

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"  # swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js
ASSETS_URL = "/docs/assets"
FAVICON = Path(__file__).resolve().parents[1] / "static" / "favicon.ico"

router = APIRouter(include_in_schema=False)


def csp(nonce: str | None = None, inline_styles: bool = False) -> str:
    scripts = f"'self' 'nonce-{nonce}'" if nonce else "'self'"
    styles = "'self' 'unsafe-inline'" if inline_styles else "'self'"
    return (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; img-src 'self' data:; connect-src 'self'; "
        "worker-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _headers(policy: str) -> dict[str, str]:
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    app, root = request.app, request.scope.get("root_path", "")
    page = get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - Swagger UI",
        swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}/favicon.ico",
        # no validator badge: it would send the schema's URL to validator.swagger.io
        swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None},
    )
    nonce = secrets.token_urlsafe(16)
    html = page.body.decode().replace("<script>", f'<script nonce="{nonce}">')  # the inline start-up script
    return HTMLResponse(html, headers=_headers(csp(nonce=nonce)))


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    app, root = request.app, request.scope.get("root_path", "")
    page = get_redoc_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}/favicon.ico",
        with_google_fonts=False,
    )
    return HTMLResponse(page.body, headers=_headers(csp(inline_styles=True)))


@router.get("/favicon.ico")
async def favicon() -> FileResponse:
    if not FAVICON.is_file():  # an install without the package data
        raise ServiceError("not_found", 404, "favicon.ico is not installed (service/static/)")
    return FileResponse(FAVICON, media_type="image/x-icon", headers={"Cache-Control": "public, max-age=86400"})


def install(app: FastAPI) -> None:
    """The pages, their assets and the favicon on `app` (created with docs_url=None, redoc_url=None)."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")
    app.include_router(router)
