"""Accuracy metrics: the distance table and GeoScore, per-group breakdowns, Recall-vs-Area
of ranked regions and the calibration of the top-1 probability.

One implementation of each metric, used by ``geoloc eval`` and by ``/v1/stats``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from index.geo import (
    cell_area_km2,
    cell_to_int,
    geoscore,
    haversine_km,
    int_to_cell,
    latlon_to_cells,
)
from index.geocode import continents

THRESHOLDS_KM: tuple[float, ...] = (1, 25, 200, 750, 2500)
#: Recall levels whose search area is reported.
RECALL_LEVELS: tuple[float, ...] = (0.5, 0.9)
#: The fixed area grid of the Recall-vs-Area curve (10 km² to the whole Earth, 20 points a
#: decade), the same in every run so that curves compare.
AREA_GRID_KM2: np.ndarray = np.logspace(1, 8.75, 156)
#: Points of the error CDF kept in a report (quantiles), enough to redraw the curve.
CDF_POINTS = 201
#: Images listed in a report for the world map of errors.
MAP_POINTS = 5000


@dataclass(frozen=True)
class DistanceSummary:
    n: int
    within: dict[float, float]  # threshold km -> share of predictions within it
    median_km: float
    mean_km: float
    mean_geoscore: float

    def to_dict(self) -> dict[str, object]:
        return {
            "n": self.n,
            "within_km": {f"{t:g}": _finite_or_none(v) for t, v in self.within.items()},
            "median_km": _finite_or_none(self.median_km),
            "mean_km": _finite_or_none(self.mean_km),
            "mean_geoscore": _finite_or_none(self.mean_geoscore),
        }


def summarize_distances(
    d_km: np.ndarray, thresholds: tuple[float, ...] = THRESHOLDS_KM
) -> DistanceSummary:
    d = np.asarray(d_km, dtype=np.float64)
    if d.size == 0:
        return DistanceSummary(0, {t: float("nan") for t in thresholds}, *(float("nan"),) * 3)
    return DistanceSummary(
        n=int(d.size),
        within={t: float(np.mean(d <= t)) for t in thresholds},
        median_km=float(np.median(d)),
        mean_km=float(np.mean(d)),
        mean_geoscore=float(np.mean(geoscore(d))),
    )


def errors_km(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Great-circle error of (n, 2) predictions against (n, 2) truths."""
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    return haversine_km(pred[:, 0], pred[:, 1], truth[:, 0], truth[:, 1])


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# -- per-group breakdown ----------------------------------------------------------------------


def breakdown(
    groups: Sequence[str], d_km: np.ndarray, thresholds: tuple[float, ...] = THRESHOLDS_KM
) -> dict[str, DistanceSummary]:
    """The distance summary of each group ("" is reported as "(none)": at sea), largest
    group first."""
    g = np.asarray([str(x) or "(none)" for x in groups], dtype=object)
    d = np.asarray(d_km, dtype=np.float64)
    names, counts = np.unique(g, return_counts=True) if len(g) else ([], [])
    order = sorted(zip(names, counts, strict=True), key=lambda nc: (-nc[1], nc[0]))
    return {str(n): summarize_distances(d[g == n], thresholds) for n, _ in order}


# -- Recall-vs-Area ---------------------------------------------------------------------------


def area_to_truth(cells: Sequence[str | int], truth: tuple[float, float], res: int) -> float:
    """km² searched, visiting ``cells`` (H3 cells at ``res``, the model's ranking, best first)
    in order, up to and including the cell that holds ``truth``; inf when none holds it."""
    target = int(latlon_to_cells(np.array([truth]), res)[0])
    name = int_to_cell(target)
    # Find the truth's cell first: only the cells searched before it are converted and measured.
    hit = next((i for i, c in enumerate(cells) if c in (name, target)), None)
    if hit is None:
        return math.inf
    ids = [cell_to_int(c) if isinstance(c, str) else int(c) for c in cells[: hit + 1]]
    return float(cell_area_km2(np.array(ids, np.int64)).sum())


def region_areas(regions: Sequence[Any], truths: np.ndarray) -> np.ndarray:
    """``area_to_truth`` of each (region, truth): a region is a dict with its ranked ``cells``
    and ``h3_resolution`` (as in a locate answer); inf where there is none."""
    return np.array(
        [
            area_to_truth(r["cells"], (float(t[0]), float(t[1])), int(r["h3_resolution"]))
            if isinstance(r, dict)
            and isinstance(r.get("cells"), list)
            and isinstance(r.get("h3_resolution"), int)
            else math.inf
            for r, t in zip(regions, truths, strict=True)
        ],
        dtype=np.float64,
    )


@dataclass(frozen=True)
class RecallVsArea:
    n: int
    recall_in_region: float  # share of truths inside the ranked region at all
    area_km2_at: dict[float, float | None]  # recall level -> area (None: never reached)
    curve: list[float]  # recall at each area of AREA_GRID_KM2

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "recall_in_region": _finite_or_none(self.recall_in_region),
            "area_km2_at_recall": {f"{r:g}": a for r, a in self.area_km2_at.items()},
            "curve": {"area_km2": AREA_GRID_KM2.tolist(), "recall": self.curve},
        }


def recall_vs_area(
    area_needed_km2: np.ndarray, levels: tuple[float, ...] = RECALL_LEVELS
) -> RecallVsArea:
    """Recall as a function of the area searched, from each prediction's ``area_to_truth``.

    The area for recall r is the smallest area A such that a share >= r of the truths lie
    within the first A km² of their ranking.
    """
    a = np.asarray(area_needed_km2, dtype=np.float64).reshape(-1)
    n = len(a)
    if n == 0:
        return RecallVsArea(0, math.nan, dict.fromkeys(levels), [math.nan] * len(AREA_GRID_KM2))
    found = np.sort(a[np.isfinite(a)])
    at: dict[float, float | None] = {}
    for r in levels:
        k = math.ceil(r * n - 1e-9)  # images that must be found
        at[r] = float(found[k - 1]) if 1 <= k <= len(found) else (0.0 if k < 1 else None)
    curve = (np.searchsorted(found, AREA_GRID_KM2, side="right") / n).tolist()
    return RecallVsArea(n, len(found) / n, at, curve)


# -- calibration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reliability:
    """How well the top-1 probability states the chance that the truth is within_km of it."""

    n: int
    within_km: float
    ece: float  # expected calibration error: sum over bins of share * |accuracy - confidence|
    mean_confidence: float
    accuracy: float
    bins: list[dict[str, Any]]  # lo, hi, n, confidence, accuracy (empty bins left out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "within_km": self.within_km,
            "ece": _finite_or_none(self.ece),
            "mean_confidence": _finite_or_none(self.mean_confidence),
            "accuracy": _finite_or_none(self.accuracy),
            "bins": self.bins,
        }


def reliability(
    confidence: np.ndarray, d_km: np.ndarray, *, within_km: float, bins: int = 10
) -> Reliability:
    """Equal-width confidence bins over [0, 1]; a prediction is right when d <= within_km."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    p = np.clip(np.asarray(confidence, dtype=np.float64).reshape(-1), 0.0, 1.0)
    hit = np.asarray(d_km, dtype=np.float64).reshape(-1) <= within_km
    if len(p) != len(hit):
        raise ValueError(f"{len(p)} confidences but {len(hit)} distances")
    n = len(p)
    if n == 0:
        return Reliability(0, within_km, math.nan, math.nan, math.nan, [])
    which = np.minimum((p * bins).astype(int), bins - 1)  # 1.0 goes into the last bin
    out, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        conf, acc = float(p[m].mean()), float(hit[m].mean())
        ece += m.sum() / n * abs(acc - conf)
        out.append(
            {
                "lo": b / bins,
                "hi": (b + 1) / bins,
                "n": int(m.sum()),
                "confidence": conf,
                "accuracy": acc,
            }
        )
    return Reliability(n, within_km, float(ece), float(p.mean()), float(hit.mean()), out)


# -- the whole report -------------------------------------------------------------------------


def report(
    d_km: np.ndarray,
    confidence: np.ndarray,
    area_needed_km2: np.ndarray,
    *,
    within_km: float,
    bins: int,
    truth_countries: np.ndarray | None = None,
    points: np.ndarray | None = None,
) -> dict[str, Any]:
    """Every metric over top-1 errors, top-1 probabilities and RvA areas (JSON-ready)."""
    d = np.asarray(d_km, dtype=np.float64)
    out: dict[str, Any] = {
        **summarize_distances(d).to_dict(),
        "recall_vs_area": recall_vs_area(area_needed_km2).to_dict(),
        "calibration": reliability(confidence, d, within_km=within_km, bins=bins).to_dict(),
        "error_cdf_km": np.quantile(d, np.linspace(0, 1, CDF_POINTS)).tolist() if len(d) else [],
    }
    if truth_countries is not None:
        codes = np.asarray(truth_countries)
        out["by_continent"] = {
            k: v.to_dict() for k, v in breakdown(list(continents(codes)), d).items()
        }
        out["by_country"] = {k: v.to_dict() for k, v in breakdown(list(codes), d).items()}
    if points is not None:
        out["points"] = {
            "columns": ["lat", "lon", "error_km"],
            "rows": np.round(points[:MAP_POINTS], 4).tolist(),
        }
    return out


def feedback_report(
    predictions: int,
    with_feedback: int,
    error_km: np.ndarray,
    probability: np.ndarray,
    regions: Sequence[Any],
    truths: Sequence[tuple[float, float]],
    *,
    within_km: float = 50.0,
    bins: int = 10,
) -> dict[str, Any]:
    """Counts and accuracy of served predictions with the metrics of ``geoloc eval`` (the
    fields of ``service.db.FeedbackSample``): share within 1/25/200/750/2500 km, median and
    mean km, mean GeoScore, Recall-vs-Area of each stored uncertainty region (a truth outside
    the returned region is not found) and the calibration of the top-1 probability for
    "within ``within_km``"; None where there is nothing to measure."""
    rep = report(
        np.asarray(error_km, dtype=np.float64),
        np.asarray(probability, dtype=np.float64),
        region_areas(list(regions), list(truths)),
        within_km=within_km,
        bins=bins,
    )
    return {
        "predictions": predictions,
        "with_feedback": with_feedback,
        "measured": len(error_km),
        **{k: rep[k] for k in ("within_km", "median_km", "mean_km", "mean_geoscore")},
        "recall_vs_area": rep["recall_vs_area"],
        "calibration": rep["calibration"],
    }
