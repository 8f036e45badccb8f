"""Accuracy metrics over predicted and true (lat, lon): the standard geolocation table."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from index.geo import geoscore, haversine_km

THRESHOLDS_KM: tuple[float, ...] = (1, 25, 200, 750, 2500)


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
            "within_km": {f"{t:g}": v for t, v in self.within.items()},
            "median_km": self.median_km,
            "mean_km": self.mean_km,
            "mean_geoscore": self.mean_geoscore,
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


def format_summary(s: DistanceSummary, label: str = "") -> str:
    head = " ".join(f"{t:>7g}km" for t in s.within)
    vals = " ".join(f"{100 * v:>8.2f}%" for v in s.within.values())
    lines = [
        f"{label}n={s.n}",
        f"  within:    {head}",
        f"             {vals}",
        f"  median km: {s.median_km:.1f}   mean km: {s.mean_km:.1f}   "
        f"GeoScore: {s.mean_geoscore:.1f}",
    ]
    return "\n".join(lines)
