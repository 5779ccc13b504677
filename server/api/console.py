"""The web console (/ui) and the API docs (/docs, /redoc), served from local files only: the console's
own files (prefixserve/ui) and Swagger UI / ReDoc from the fastapi-offline package (installed with the
server), so both work with no network. The console keeps the API key in the tab's sessionStorage and
sends it as a bearer header (no cookie, so there is nothing for a cross-site request to ride on)."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "ui"
DOCS_ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
DOCS_ASSETS_URL = "/static/docs"

# The console runs only its own script and style; what it renders from the API is text, never markup.
CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
    " img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


# ReDoc's footer shows a logo from its CDN: images and fonts come from this server only
DOCS_HEADERS = {"Content-Security-Policy": "img-src 'self' data:; font-src 'self' data:"}


class ConsoleFiles(StaticFiles):
    """The console's files, each with the headers above."""

    async def get_response(self, path: str, scope: Scope):
        response = await super().get_response(path, scope)
        response.headers.update(CONSOLE_HEADERS)
        return response


def install_console(app: FastAPI) -> None:
    """Mount /ui, /docs, /redoc and their assets on `app` (create it with docs_url=redoc_url=None)."""
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    app.mount("/ui", ConsoleFiles(directory=CONSOLE_DIR, html=True), name="console")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        root_path = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=root_path + app.openapi_url,
            title=app.title + " - Swagger UI",
            swagger_js_url=root_path + DOCS_ASSETS_URL + "/swagger-ui-bundle.js",
            swagger_css_url=root_path + DOCS_ASSETS_URL + "/swagger-ui.css",
            swagger_favicon_url=root_path + DOCS_ASSETS_URL + "/favicon.png",
            oauth2_redirect_url=root_path + "/docs/oauth2-redirect",
        )
        page.headers.update(DOCS_HEADERS)
        return page

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root_path = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=root_path + app.openapi_url,
            title=app.title + " - ReDoc",
            redoc_js_url=root_path + DOCS_ASSETS_URL + "/redoc.standalone.js",
            redoc_favicon_url=root_path + DOCS_ASSETS_URL + "/favicon.png",
            with_google_fonts=False,
        )
        page.headers.update(DOCS_HEADERS)
        return page
