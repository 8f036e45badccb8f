"""POST /v1/admin/index/activate (a key with the admin scope)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api import instance
from service.api.deps import AdminCaller, SessionDep, StateDep
from service.api.openapi import RouteDocs
from service.api.problems import openapi_problems
from service.api.schemas import ActivateIn, ActivateOut
from service.config import Settings


def activate_index(
    caller: AdminCaller, body: ActivateIn, session: SessionDep, state: StateDep
) -> ActivateOut:
    """Make NAME/VERSION the served version; every replica swaps to it within
    GEOLOC_INDEX_POLL_S. Needs auth on and a key with the admin scope."""
    return instance.activate_index(state, session, body.name, body.version)


def router(settings: Settings) -> APIRouter:
    api = APIRouter(tags=["admin"])
    api.add_api_route(
        "/v1/admin/index/activate",
        activate_index,
        methods=["POST"],
        operation_id="activate_index",
        responses=openapi_problems(400, 401, 403, 404, 413, 422, 429, 500, 503),
        openapi_extra=RouteDocs.of(settings).secured,
    )
    return api
