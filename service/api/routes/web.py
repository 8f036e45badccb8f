"""The page at ``/``: our files under /web, the built libraries and base map under /web/lib."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.staticfiles import StaticFiles

from service.api.webpage import PAGE_DIR, missing_assets, not_built_page
from service.config import Settings


def add_web_page(app: FastAPI, settings: Settings) -> None:
    """The route of ``/`` and the static mounts (an app's, not a router's: FastAPI's
    include_router does not carry mounts).

    Without built assets the service still starts; ``/`` then says how to build them.
    """
    assets = settings.web_assets_path
    # Checked once: assets built later are served after a restart (the page says so).
    missing = missing_assets(assets)
    not_built = not_built_page(assets, missing) if missing else None

    def web_page() -> Response:
        if not_built is not None:
            return HTMLResponse(not_built, status_code=503)
        return FileResponse(PAGE_DIR / "index.html", media_type="text/html")

    api = APIRouter()
    api.add_api_route("/", web_page, methods=["GET"], include_in_schema=False)
    app.include_router(api)
    if not missing:  # mounted first: /web would otherwise take /web/lib/... too
        app.mount("/web/lib", StaticFiles(directory=assets), name="web-lib")
    app.mount("/web", StaticFiles(directory=PAGE_DIR), name="web")
