"""Predictions, their feedback and the statistics over both."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from index.geo import haversine_km, latlon_valid
from service.db.models import (
    Feedback,
    Prediction,
    utcnow,
)
from service.db.session import _begin_write, _commit
from service.errors import InvalidOptionError, NotFoundError


def _float_or_none(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _aware(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def record_prediction(
    session: Session,
    *,
    profile: str,
    index_version: str,
    result: dict[str, Any],
    latency_ms: float,
    api_key_id: int | None = None,
    client: str | None = None,
    prediction_id: str | None = None,
) -> str:
    """Store one locate result; returns the prediction id (32 hex characters; a caller may
    choose it beforehand, e.g. to log with it while the request runs)."""
    _begin_write(session)
    candidates = result.get("candidates") or []
    top = candidates[0] if candidates and isinstance(candidates[0], dict) else {}
    pred = Prediction(
        id=prediction_id or uuid.uuid4().hex,
        created_at=utcnow(),
        profile=profile,
        index_version=index_version,
        lat=_float_or_none(top.get("lat")),
        lon=_float_or_none(top.get("lon")),
        probability=_float_or_none(top.get("probability")),
        response=result,  # made JSON-safe when written (_json_dumps)
        latency_ms=float(latency_ms),
        api_key_id=api_key_id,
        client=client[:255] if client else None,
    )
    session.add(pred)
    _commit(session)
    return pred.id


def get_prediction(session: Session, prediction_id: str) -> Prediction | None:
    if not isinstance(prediction_id, str) or len(prediction_id) > 32:
        return None
    return session.get(Prediction, prediction_id)


def _check_latlon(lat: Any, lon: Any) -> tuple[float, float]:
    out = []
    for what, value in (("lat", lat), ("lon", lon)):
        # bool is an int to Python, but True is not a coordinate.
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise InvalidOptionError(f"{what} must be a number, got {value!r}")
        out.append(float(value))
    if not latlon_valid(*out):
        raise InvalidOptionError(
            f"({out[0]}, {out[1]}) is not a valid (lat, lon): need finite lat in [-90, 90] and "
            "lon in [-180, 180]"
        )
    return out[0], out[1]


def add_feedback(session: Session, prediction_id: str, lat: float, lon: float) -> Feedback:
    """Record the true location of a prediction and its top-1 error in km.

    One feedback per prediction: a second call replaces the first (same row, new lat/lon,
    error_km and created_at), so a user can correct a mistake.
    """
    _begin_write(session)
    lat_f, lon_f = _check_latlon(lat, lon)
    pred = get_prediction(session, prediction_id)
    if pred is None:
        raise NotFoundError(f"no prediction with id {prediction_id!r}")
    error_km = None
    if pred.lat is not None and pred.lon is not None:
        error_km = float(haversine_km(pred.lat, pred.lon, lat_f, lon_f))
    values = {"lat": lat_f, "lon": lon_f, "error_km": error_km, "created_at": utcnow()}

    def existing() -> Feedback | None:
        return session.scalar(select(Feedback).where(Feedback.prediction_id == pred.id))

    fb = existing()
    if fb is None:
        try:
            with session.begin_nested():  # a savepoint: losing a race must not undo the rest
                fb = Feedback(prediction_id=pred.id, **values)
                session.add(fb)
        except IntegrityError:
            fb = existing()  # a concurrent request inserted it first: replace theirs
            if fb is None:
                raise
    for key, value in values.items():
        setattr(fb, key, value)
    _commit(session)
    return fb


@dataclass(frozen=True)
class FeedbackSample:
    """What the statistics of a window are computed from (``service.engine.scores.
    feedback_report(**vars(sample))``): the counts, and the measured predictions' errors, top-1
    probabilities, stored regions (cells and resolution) and true positions."""

    predictions: int
    with_feedback: int
    error_km: np.ndarray
    probability: np.ndarray
    regions: list[dict[str, Any]]
    truths: list[tuple[float, float]]


def feedback_sample(
    session: Session,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    max_rows: int = 50_000,
) -> FeedbackSample:
    """Predictions made in [since, until) (open ends when None): how many, how many got
    feedback, and the newest ``max_rows`` of those with feedback that had a candidate."""
    window = []
    if since is not None:
        window.append(Prediction.created_at >= _aware(since))
    if until is not None:
        window.append(Prediction.created_at < _aware(until))
    count_q = select(func.count()).select_from(Prediction).where(*window)
    fb_q = (
        select(func.count())
        .select_from(Feedback)
        .join(Prediction, Feedback.prediction_id == Prediction.id)
        .where(*window)
    )
    rows_q = (
        select(
            Feedback.error_km,
            Feedback.lat,
            Feedback.lon,
            Prediction.probability,
            # Only the region's cells and resolution: its GeoJSON is the bulk of a response.
            Prediction.response[("region", "cells")],
            Prediction.response[("region", "h3_resolution")],
        )
        .join(Prediction, Feedback.prediction_id == Prediction.id)
        .where(*window, Feedback.error_km.is_not(None))
        .order_by(Prediction.created_at.desc())
        .limit(max_rows)
    )
    rows = session.execute(rows_q).all()
    return FeedbackSample(
        predictions=int(session.scalar(count_q) or 0),
        with_feedback=int(session.scalar(fb_q) or 0),
        error_km=np.array([r[0] for r in rows], dtype=np.float64),
        probability=np.array([_float_or_none(r[3]) or 0.0 for r in rows], dtype=np.float64),
        regions=[{"cells": cells, "h3_resolution": res} for *_, cells, res in rows],
        truths=[(lat, lon) for _, lat, lon, *_ in rows],
    )
