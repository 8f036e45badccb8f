"""GET /v1/stats: the predictions in a window, their feedback metrics and calibration."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from service.api import records
from service.api.deps import LocateCaller, SessionDep, StateDep
from service.api.openapi import RouteDocs
from service.api.problems import openapi_problems
from service.api.schemas import StatsOut
from service.config import Settings
from service.errors import InvalidOptionError


def _instant(name: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidOptionError(
            f"{name} must be an ISO 8601 date-time such as 2026-01-31T12:00:00Z, not {text!r}"
        ) from None


def stats_query(
    since: Annotated[
        str | None,
        Query(
            description="ISO 8601 date or date-time (UTC unless it has an offset); only "
            "predictions made since then.",
            json_schema_extra={"format": "date-time"},
            max_length=64,
        ),
    ] = None,
    until: Annotated[
        str | None,
        Query(
            description="ISO 8601 date or date-time; only predictions made before then.",
            json_schema_extra={"format": "date-time"},
            max_length=64,
        ),
    ] = None,
    within_km: Annotated[
        float | None,
        Query(
            gt=0,
            le=20_000,
            description="Calibration event: the top-1 answer within this many km; default "
            "GEOLOC_CALIBRATION_KM.",
        ),
    ] = None,
    bins: Annotated[int, Query(ge=1, le=100, description="Reliability bins.")] = 10,
) -> records.StatsQuery:
    return records.StatsQuery(
        since=_instant("since", since),
        until=_instant("until", until),
        within_km=within_km,
        bins=bins,
    )


StatsQueryDep = Annotated[records.StatsQuery, Depends(stats_query)]


def get_stats(
    caller: LocateCaller, session: SessionDep, state: StateDep, query: StatsQueryDep
) -> StatsOut:
    """Prediction counts and, over the predictions with feedback made in the window
    [since, until), the metrics of `geoloc eval`: distance table, GeoScore,
    Recall-vs-Area of the returned regions, calibration (ECE) of the top-1 probability;
    and this process's request counts."""
    return records.stats(session, state.metrics, state.settings, query)


def router(settings: Settings) -> APIRouter:
    docs = RouteDocs.of(settings)
    api = APIRouter(tags=["predictions"])
    api.add_api_route(
        "/v1/stats",
        get_stats,
        methods=["GET"],
        operation_id="stats",
        responses=openapi_problems(*docs.auth_errors, 422, 500, 503),
        openapi_extra=docs.secured,
    )
    return api
