"""The HTTP API (FastAPI): the app, its middleware, exception handlers and routers.

    uvicorn --factory service.api.main:create_app      (or: geoloc serve)

Routes are thin (service/api/routes/, one router per resource): parse, then call one function
in service/api/operations.py (or records.py, instance.py). Every error is an
``application/problem+json`` body (service/api/problems.py, rendered by handlers.py; docs/API.md
lists the types). State lives in one ServiceState on ``app.state.service``; the dependencies
of service/api/deps.py hand routes what they need.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api.bodylimit import BodyLimitMiddleware
from service.api.handlers import add_exception_handlers
from service.api.metrics import MetricsMiddleware
from service.api.openapi import install_docs, install_openapi
from service.api.problems import PROBLEM_MEDIA_TYPE
from service.api.replica import ReplicaHeaderMiddleware
from service.api.routes import include_routes
from service.api.runtime import build_state
from service.config import Settings
from service.engine.locator import Locator


def create_app(settings: Settings | None = None, *, locator: Locator | None = None) -> FastAPI:
    """The ASGI app. The lifespan loads the Locator (unless one is given), the database and
    the micro-batcher, and starts the index poller."""
    settings = settings or Settings()
    state = build_state(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start(locator)
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="geoloc",
        version="0.1.0",
        summary="Image geolocation: ranked GPS candidates with probabilities, H3 cells, "
        "place names and an uncertainty region.",
        lifespan=lifespan,
        # Our own /docs and /redoc (openapi.install_docs): FastAPI's load from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = state
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(ReplicaHeaderMiddleware, name=settings.replica_name or socket.gethostname())
    add_exception_handlers(app)
    include_routes(app, settings)
    install_openapi(app, settings)
    install_docs(app, settings)
    return app


__all__ = ["PROBLEM_MEDIA_TYPE", "create_app"]
