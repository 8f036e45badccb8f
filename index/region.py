"""Where the probability mass is: the uncertainty region (H3 cells) and per-country mass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from index.geo import (
    GeoError,
    cell_area_km2,
    cells_to_geojson,
    int_to_cell,
    latlon_to_cells,
    validate_latlon,
)


@dataclass
class Region:
    cells: list[str]  # H3 cells, most probable first
    mass: list[float]  # each cell's share of the total probability
    share: float  # the share asked for
    covered: float  # the share the cells actually hold (>= share)
    area_km2: float
    geojson: dict  # FeatureCollection, one Polygon per cell, value = mass


def _check_probs(probs: Any, n: int) -> tuple[np.ndarray, float]:
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if len(p) != n:
        raise GeoError(f"{n} points but {len(p)} probabilities")
    if not np.isfinite(p).all() or (p < 0).any():
        raise GeoError("probabilities must be finite and >= 0")
    total = float(p.sum())
    if not total > 0:
        raise GeoError("probabilities sum to zero; nothing to locate")
    return p, total


def uncertainty_region(latlon: Any, probs: Any, *, res: int, share: float) -> Region:
    """The fewest res-`res` cells whose summed point probability reaches share·total.

    Probabilities need not sum to 1; masses are reported as fractions of their total.
    Ties in cell mass are broken by cell id, so the result is deterministic.
    """
    if not (isinstance(share, int | float) and 0.0 < share <= 1.0):
        raise GeoError(f"share must be in (0, 1]; got {share!r}")
    pts = validate_latlon(latlon)
    p, total = _check_probs(probs, len(pts))
    cells, inverse = np.unique(latlon_to_cells(pts, res), return_inverse=True)
    mass = np.bincount(inverse.reshape(-1), weights=p, minlength=len(cells)) / total
    order = np.lexsort((cells, -mass))  # mass descending, then cell id
    cum = np.cumsum(mass[order])
    # The tolerance keeps share=1.0 (or an exact boundary such as 0.5+0.3 vs 0.8) from
    # failing on float rounding and dragging in a zero-mass cell.
    k = int(np.searchsorted(cum, share - 1e-12, side="left")) + 1
    k = min(k, int(np.count_nonzero(mass > 0)))
    chosen, chosen_mass = cells[order[:k]], mass[order[:k]]
    names = [int_to_cell(c) for c in chosen.tolist()]
    values = [float(m) for m in chosen_mass]
    return Region(
        cells=names,
        mass=values,
        share=float(share),
        covered=float(cum[k - 1]),
        area_km2=float(cell_area_km2(chosen).sum()),
        geojson=cells_to_geojson(names, values),
    )


def country_distribution(codes: Any, probs: Any) -> list[tuple[str, float]]:
    """[(country code, probability)] summing to 1, most probable first ("" = no country)."""
    c = np.asarray(codes, dtype="<U2").reshape(-1)
    p, total = _check_probs(probs, len(c))
    names, inverse = np.unique(c, return_inverse=True)
    mass = np.bincount(inverse.reshape(-1), weights=p, minlength=len(names)) / total
    order = np.lexsort((names, -mass))  # descending, ties alphabetical
    return [(str(names[i]), float(mass[i])) for i in order]
