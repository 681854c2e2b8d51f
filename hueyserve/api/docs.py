"""The interactive API docs (/docs), served from this process: Swagger UI's files come from
the `swagger-ui-bundle` wheel, not a CDN, so the docs work without internet. FastAPI's own
/docs and /redoc load their scripts from a CDN and are turned off."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from hueyserve.api import paths


def add_docs(app: FastAPI) -> None:
    app.mount(paths.DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get(paths.DOCS_UI, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=paths.OPENAPI,
            title=f"{app.title} - API docs",
            oauth2_redirect_url=paths.DOCS_OAUTH2,
            swagger_js_url=f"{paths.DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{paths.DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{paths.DOCS_ASSETS}/favicon-32x32.png",
        )

    @app.get(paths.DOCS_OAUTH2, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
