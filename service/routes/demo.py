"""The demo page at `/` (TRIMVLM_DEMO_PAGE, on by default): one HTML page, one script and one
stylesheet from service/static/, no build step and nothing fetched from elsewhere. The page
calls the public API from the browser (so the API key, when the server has one, is typed in
the page, never embedded in it)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.errors import ServiceError

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).resolve().parents[1] / "static"

# The only files served: a fixed list, so no request path ever reaches the file system.
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}

# Same-origin everything; images only from the page itself (data:/blob: previews).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # small files; revalidated with ETag / Last-Modified
}


def _file(name: str, media_type: str) -> FileResponse:
    path = STATIC / name
    if not path.is_file():  # an install without the package data
        raise ServiceError("not_found", 404, f"demo asset {name!r} is not installed (service/static/)")
    return FileResponse(path, media_type=media_type, headers=HEADERS)


@router.get("/")
async def page():
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/static/{name}")
async def asset(name: str):
    if name not in ASSETS:
        raise ServiceError("not_found", 404, f"no static file {name!r}")
    return _file(name, ASSETS[name])
