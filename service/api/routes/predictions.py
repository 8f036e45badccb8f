"""GET /v1/predictions/{id} and POST /v1/predictions/{id}/feedback."""

from __future__ import annotations

from fastapi import APIRouter

from service.api import records
from service.api.deps import LocateCaller, PredictionId, SessionDep
from service.api.openapi import RouteDocs
from service.api.problems import openapi_problems
from service.api.schemas import FeedbackIn, FeedbackOut, PredictionOut
from service.config import Settings


def get_prediction(
    caller: LocateCaller, prediction_id: PredictionId, session: SessionDep
) -> PredictionOut:
    """A recorded prediction: the answer as it was returned."""
    return records.prediction_view(session, prediction_id)


def add_feedback(
    caller: LocateCaller, prediction_id: PredictionId, body: FeedbackIn, session: SessionDep
) -> FeedbackOut:
    """The true location of a predicted image; a second call replaces the first."""
    return records.submit_feedback(session, prediction_id, body.lat, body.lon)


def router(settings: Settings) -> APIRouter:
    docs = RouteDocs.of(settings)
    api = APIRouter(tags=["predictions"])
    api.add_api_route(
        "/v1/predictions/{prediction_id}",
        get_prediction,
        methods=["GET"],
        operation_id="get_prediction",
        responses=openapi_problems(*docs.auth_errors, 404, 422, 500, 503),
        openapi_extra=docs.secured,
    )
    api.add_api_route(
        "/v1/predictions/{prediction_id}/feedback",
        add_feedback,
        methods=["POST"],
        operation_id="add_feedback",
        responses=openapi_problems(400, *docs.auth_errors, 404, 413, 422, 500, 503),
        openapi_extra=docs.secured,
    )
    return api
