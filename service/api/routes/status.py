"""GET /v1/info, /healthz, /readyz and /metrics: what this process serves and how it is."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from service.api import instance
from service.api.deps import LocatorDep, SettingsDep, StateDep
from service.api.problems import openapi_problems
from service.api.schemas import HealthOut, InfoOut, ReadyOut
from service.config import Settings


def info(locator: LocatorDep, settings: SettingsDep) -> InfoOut:
    """The model profile (and what it locates), the served index, and the limits."""
    return instance.service_info(settings, locator)


def healthz() -> HealthOut:
    """200 while the process runs."""
    return HealthOut(status="ok")


def readyz(state: StateDep) -> ReadyOut:
    """200 when the model, the index and the database (schema at head) are ready."""
    return instance.readiness(state)


def metrics(state: StateDep) -> Response:
    """Prometheus metrics of this process."""
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


def router(settings: Settings) -> APIRouter:
    api = APIRouter(tags=["service"])
    api.add_api_route(
        "/v1/info",
        info,
        methods=["GET"],
        operation_id="info",
        responses=openapi_problems(500, 503),
    )
    api.add_api_route("/healthz", healthz, methods=["GET"], operation_id="healthz")
    api.add_api_route(
        "/readyz",
        readyz,
        methods=["GET"],
        operation_id="readyz",
        responses=openapi_problems(500, 503),
    )
    api.add_api_route(
        "/metrics",
        metrics,
        methods=["GET"],
        operation_id="metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    return api
