"""The recorded predictions, without HTTP: one by id, the feedback on it, the stats over them
(the /v1/predictions and /v1/stats routes call one function here)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from service import db
from service.api.metrics import Metrics
from service.api.schemas import FeedbackOut, PredictionOut, RequestCount, StatsOut
from service.config import Settings
from service.engine.scores import feedback_report
from service.errors import NotFoundError


def prediction_view(session: Session, prediction_id: str) -> PredictionOut:
    row = db.get_prediction(session, prediction_id)
    if row is None:
        raise NotFoundError(f"no prediction with id {prediction_id!r}")
    return PredictionOut(
        id=row.id,
        created_at=row.created_at,
        profile=row.profile,
        index_version=row.index_version,
        latency_ms=row.latency_ms,
        result=row.response,
    )


def submit_feedback(session: Session, prediction_id: str, lat: float, lon: float) -> FeedbackOut:
    fb = db.add_feedback(session, prediction_id, lat, lon)
    return FeedbackOut(
        prediction_id=fb.prediction_id,
        lat=fb.lat,
        lon=fb.lon,
        error_km=fb.error_km,
        created_at=fb.created_at,
    )


@dataclass(frozen=True)
class StatsQuery:
    """The window and the calibration event of /v1/stats (None: the settings' defaults)."""

    since: datetime | None = None
    until: datetime | None = None
    within_km: float | None = None
    bins: int = 10


def stats(session: Session, metrics: Metrics, settings: Settings, query: StatsQuery) -> StatsOut:
    # A window whose end is not after its start is empty: zero predictions, not an error.
    sample = db.feedback_sample(
        session, query.since, query.until, max_rows=settings.stats_max_predictions
    )
    summary = feedback_report(
        **vars(sample),
        within_km=settings.calibration_km if query.within_km is None else query.within_km,
        bins=query.bins,
    )
    requests = [RequestCount(**r) for r in metrics.request_counts()]
    return StatsOut(since=query.since, until=query.until, requests=requests, **summary)
