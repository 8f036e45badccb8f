"""The routes, one APIRouter per resource. Each module's ``router(settings)`` builds its
router: what the OpenAPI document says of a route depends on the settings (auth, batch size).
"""

from __future__ import annotations

from fastapi import FastAPI

from service.api.routes import admin, locate, predictions, stats, status, web
from service.config import Settings


def include_routes(app: FastAPI, settings: Settings) -> None:
    for module in (locate, predictions, stats, admin, status):
        app.include_router(module.router(settings))
    web.add_web_page(app, settings)
