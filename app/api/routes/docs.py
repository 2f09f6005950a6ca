"""/docs and /redoc with their scripts served from here, so they render on a host without internet.

FastAPI's own pages load Swagger UI and ReDoc from a CDN. The same files ship in the
`fastapi-offline` package (MIT; its static folder holds swagger-ui-bundle.js, swagger-ui.css,
redoc.standalone.js and a favicon): only those files are used, with FastAPI's own page builders.
Like FastAPI's pages these routes are public; /openapi.json is unchanged.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

from app.exceptions import NotFound

router = APIRouter(include_in_schema=False)

ASSETS_URL = "/docs/assets"
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
OAUTH2_REDIRECT = "/docs/oauth2-redirect"


def assets_dir() -> Path:
    return Path(str(files("fastapi_offline") / "static"))


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    app = request.app
    return get_swagger_ui_html(
        openapi_url=app.openapi_url,
        title=f"{app.title} - Swagger UI",
        swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        oauth2_redirect_url=OAUTH2_REDIRECT,
    )


@router.get(OAUTH2_REDIRECT)
def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    app = request.app
    return get_redoc_html(
        openapi_url=app.openapi_url,
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )


@router.get(ASSETS_URL + "/{name}")
def docs_asset(name: str) -> FileResponse:
    if name not in ASSETS:  # a fixed list: no request path reaches the filesystem
        raise NotFound(f"no docs asset {name!r}", field="name")
    # The files change only with the package version: let browsers keep them a day.
    return FileResponse(
        assets_dir() / name, media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"}
    )
