"""/v1/stats: the metrics of `geoloc eval` over the predictions with feedback in a time
window, computed by the same functions; bad window parameters are a 4xx."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from api_helpers import assert_problem, tile_bytes
from sqlalchemy import update

from index.geo import haversine_km
from service.db import make_engine
from service.db.models import Prediction
from service.engine.scores import area_to_truth, report

pytest_plugins = ["api_fixtures"]

PLACES = [(23.0, 12.0), (29.5, 84.0), (-4.0, -63.0), (-25.0, 133.0), (30.8, 31.0), (55.0, 100.0)]


def expected(located: list[dict], truths: list[tuple[float, float]], within_km: float) -> dict:
    """The eval report of these answers, from the evaluation functions directly."""
    tops = [b["candidates"][0] for b in located]
    d = np.array(
        [haversine_km(t["lat"], t["lon"], a, b) for t, (a, b) in zip(tops, truths, strict=True)]
    )
    conf = np.array([t["probability"] for t in tops])
    areas = np.array(
        [
            area_to_truth(b["region"]["cells"], truth, b["region"]["h3_resolution"])
            for b, truth in zip(located, truths, strict=True)
        ]
    )
    return report(d, conf, areas, within_km=within_km, bins=10)


def same(a: object, b: object) -> bool:
    """Equal JSON values, floats to 1e-9 (nested dicts and lists)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float | int) and isinstance(b, float | int):
        return a == pytest.approx(b, rel=1e-9)
    return a == b


def check(stats: dict, exp: dict) -> None:
    assert stats["measured"] == exp["n"]
    for key in ("within_km", "median_km", "mean_geoscore", "recall_vs_area", "calibration"):
        assert same(stats[key], exp[key]), (key, stats[key], exp[key])


def test_stats_measure_eval_metrics_over_a_time_window(make_client, db_url):
    with make_client() as client:
        located = []
        for lat, lon in PLACES:
            body = client.post("/v1/locate", files={"file": ("t.png", tile_bytes(lat, lon))})
            assert body.status_code == 200, body.text
            located.append(body.json())
            pid = located[-1]["prediction_id"]
            r = client.post(f"/v1/predictions/{pid}/feedback", json={"lat": lat, "lon": lon})
            assert r.status_code == 200
        client.post("/v1/locate", files={"file": ("t.png", tile_bytes(60.0, 60.0))})  # no truth

        stats = client.get("/v1/stats").json()
        assert stats["predictions"] == 7 and stats["with_feedback"] == 6
        check(stats, expected(located, PLACES, 50.0))
        rva = stats["recall_vs_area"]
        assert set(rva["area_km2_at_recall"]) == {"0.5", "0.9"} and rva["n"] == 6
        assert stats["calibration"]["within_km"] == 50.0  # GEOLOC_CALIBRATION_KM

        # The first three predictions were made two days ago.
        now = datetime.now(UTC)
        engine = make_engine(db_url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    update(Prediction)
                    .where(Prediction.id.in_([b["prediction_id"] for b in located[:3]]))
                    .values(created_at=now - timedelta(days=2))
                )
        finally:
            engine.dispose()
        day_ago = (now - timedelta(days=1)).isoformat()
        recent = client.get("/v1/stats", params={"since": day_ago}).json()
        assert recent["predictions"] == 4 and recent["with_feedback"] == 3
        check(recent, expected(located[3:], PLACES[3:], 50.0))
        old = client.get("/v1/stats", params={"until": day_ago, "within_km": 2000}).json()
        assert old["predictions"] == 3 and old["until"] is not None
        check(old, expected(located[:3], PLACES[:3], 2000.0))
        window = {"since": (now - timedelta(days=3)).isoformat(), "until": day_ago}
        assert client.get("/v1/stats", params=window).json()["measured"] == 3
        same = client.get("/v1/stats", params={"since": day_ago, "until": day_ago}).json()
        assert same["predictions"] == 0  # [since, until) with equal ends: an empty window
        reversed_ = {"since": "2030-01-01", "until": "2020-01-01"}
        assert client.get("/v1/stats", params=reversed_).json()["predictions"] == 0
        empty = client.get("/v1/stats", params={"until": "2000-01-01"}).json()
        assert empty["measured"] == 0 and empty["calibration"]["ece"] is None
        assert empty["recall_vs_area"]["area_km2_at_recall"] == {"0.5": None, "0.9": None}

        bad = [
            ({"until": "soon"}, "invalid-option"),
            ({"within_km": "0"}, "invalid-request"),
            ({"within_km": "far"}, "invalid-request"),
            ({"within_km": "30000"}, "invalid-request"),
            ({"bins": "0"}, "invalid-request"),
            ({"bins": "1000"}, "invalid-request"),
        ]
        for params, problem in bad:
            assert_problem(client.get("/v1/stats", params=params), 422, problem)
