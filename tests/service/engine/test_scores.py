"""The metrics of `geoloc eval` and /v1/stats on hand-made cases with known answers."""

import importlib.resources
import math

import numpy as np
import pytest

from index.geo import cell_area_km2, cells_to_latlon, latlon_to_cells
from index.geocode import continents
from service.engine.scores import (
    AREA_GRID_KM2,
    area_to_truth,
    breakdown,
    recall_vs_area,
    reliability,
    report,
)

# Five res-3 cells along a parallel, in a made-up ranking (not west to east).
_POINTS = np.array([[45.0, lon] for lon in (10.0, 2.0, 6.0, 14.0, 18.0)])
RANKED = latlon_to_cells(_POINTS, 3)


def test_recall_vs_area_truth_in_the_third_region_needs_the_first_three():
    assert len(set(RANKED.tolist())) == 5
    areas = cell_area_km2(RANKED)
    third = tuple(cells_to_latlon(RANKED[2:3])[0])
    assert area_to_truth(RANKED, third, 3) == pytest.approx(areas[:3].sum())
    # The same with H3 strings, as a stored response holds them.
    from index.geo import int_to_cell

    names = [int_to_cell(c) for c in RANKED]
    assert area_to_truth(names, third, 3) == pytest.approx(areas[:3].sum())
    assert area_to_truth(names, tuple(_POINTS[0]), 3) == pytest.approx(areas[0])
    assert area_to_truth(names, (-30.0, 140.0), 3) == math.inf  # in no ranked cell
    assert area_to_truth([], (0.0, 0.0), 3) == math.inf


def test_recall_vs_area_levels_and_curve():
    r = recall_vs_area(np.array([100.0, 300.0, math.inf, 200.0]))
    assert r.n == 4 and r.recall_in_region == 0.75
    # 50 % = 2 of 4 truths found: after 200 km²; 90 % needs all 4, one is never found.
    assert r.area_km2_at == {0.5: 200.0, 0.9: None}
    curve = dict(zip(AREA_GRID_KM2.tolist(), r.curve, strict=True))
    grid = np.asarray(AREA_GRID_KM2)
    assert curve[grid[grid < 100].max()] == 0.0
    assert curve[grid[(grid >= 200) & (grid < 300)].min()] == 0.5
    assert r.curve[-1] == 0.75
    d = r.to_dict()
    assert d["area_km2_at_recall"] == {"0.5": 200.0, "0.9": None}
    empty = recall_vs_area(np.array([]))
    assert empty.n == 0 and empty.area_km2_at == {0.5: None, 0.9: None}


def test_ece_is_near_zero_for_a_calibrated_predictor_and_large_for_an_overconfident_one():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20_000)
    right = rng.random(len(p)) < p  # right with exactly the stated probability
    d = np.where(right, 10.0, 5000.0)
    calibrated = reliability(p, d, within_km=50, bins=10)
    assert calibrated.ece < 0.02
    assert sum(b["n"] for b in calibrated.bins) == len(p)
    overconfident = reliability(np.sqrt(p), d, within_km=50, bins=10)  # states more than it has
    assert overconfident.ece > 0.1
    assert overconfident.mean_confidence > overconfident.accuracy
    # The event matters: within 6000 km every answer is right.
    assert reliability(p, d, within_km=6000).accuracy == 1.0
    with pytest.raises(ValueError):
        reliability(p, d, within_km=50, bins=0)


def test_breakdown_by_group_and_continents_of_every_geocoder_country():
    d = np.array([10.0, 20.0, 3000.0, 5.0])
    groups = breakdown(["FR", "FR", "", "BR"], d)
    assert list(groups) == ["FR", "(none)", "BR"]
    assert groups["FR"].n == 2 and groups["FR"].median_km == 15.0
    assert list(continents(["FR", "na", "BR", "", "ZZ"])) == [
        "Europe",
        "Africa",
        "South America",
        "",
        "",
    ]
    # Every country the reverse geocoder can answer has a continent.
    text = (importlib.resources.files("reverse_geocode") / "countries.csv").read_text()
    codes = [line.split(",")[0] for line in text.splitlines() if line]
    missing = [c for c, k in zip(codes, continents(codes), strict=True) if not k]
    assert set(missing) <= {"AP", "EU"}  # GeoNames' "Asia/Pacific" and "Europe" pseudo-codes


def test_report_is_json_ready_with_breakdowns():
    rep = report(
        np.array([10.0, 400.0]),
        np.array([0.9, 0.2]),
        np.array([1000.0, math.inf]),
        within_km=50,
        bins=5,
        truth_countries=np.array(["FR", ""]),
        points=np.array([[45.0, 2.0, 10.0], [0.0, -30.0, 400.0]]),
    )
    import json

    again = json.loads(json.dumps(rep, allow_nan=False))
    assert again["by_continent"] == {
        "Europe": again["by_country"]["FR"],
        "(none)": again["by_country"]["(none)"],
    }
    assert again["recall_vs_area"]["area_km2_at_recall"] == {"0.5": 1000.0, "0.9": None}
    assert again["calibration"]["ece"] == pytest.approx((0.1 + 0.2) / 2)
    assert len(again["error_cdf_km"]) > 2 and again["points"]["rows"][1] == [0.0, -30.0, 400.0]
