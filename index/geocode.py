"""Offline reverse geocoding: country, admin-1 region and nearest city for points.

Backed by the `reverse_geocode` package (GeoNames cities with population > 1000, shipped
with the package, a KD-tree over them) plus the GSHHG land mask so that open ocean is
not attributed to whichever country owns the nearest island town.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import reverse_geocode

from index.geo import GeoError, haversine_km, is_land, validate_latlon

DEFAULT_SEA_KM = 200.0


@dataclass(frozen=True)
class Place:
    country_code: str | None
    country: str | None
    admin1: str | None
    city: str | None
    city_distance_km: float | None


_AT_SEA = Place(None, None, None, None, None)


def _or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class ReverseGeocoder:
    """Build once (loads the city KD-tree; the land mask on first need), then call per batch.

    A point counts as at sea when it is not on land *and* its nearest city is farther
    than `sea_km`; such points get no country, region or city. Land far from towns
    (Sahara, Antarctica) still takes the nearest city's country. Note the package's
    KD-tree works in raw degrees, so "nearest" is approximate at high latitudes and
    across the antimeridian; the distance we report is the true great-circle one.
    """

    def __init__(self, sea_km: float = DEFAULT_SEA_KM) -> None:
        if not sea_km >= 0:
            raise GeoError(f"sea_km must be >= 0; got {sea_km}")
        self.sea_km = float(sea_km)
        reverse_geocode.search([(0.0, 0.0)])  # the city KD-tree: ~1 s, needed by every call

    def warm(self) -> None:
        """Load the land mask now (~10 s) rather than in the first call that needs it.

        A server calls this at start-up; a one-shot command need not pay for it.
        """
        is_land(np.zeros((1, 2)))

    def _nearest(self, pts: np.ndarray) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
        """Nearest city records, their distance in km, and an at-sea mask."""
        if not len(pts):
            return [], np.zeros(0), np.zeros(0, dtype=bool)
        records = reverse_geocode.search(pts.tolist())  # one KD-tree query for all points
        city = np.array([(r["latitude"], r["longitude"]) for r in records], dtype=np.float64)
        dist = haversine_km(pts[:, 0], pts[:, 1], city[:, 0], city[:, 1])
        at_sea = np.zeros(len(pts), dtype=bool)
        far = np.flatnonzero(dist > self.sea_km)
        if len(far):  # the land test only where a city does not settle it
            at_sea[far] = ~is_land(pts[far])
        return records, dist, at_sea

    def lookup(self, latlon: Any) -> list[Place]:
        """One Place per (lat, lon) row."""
        pts = validate_latlon(latlon)
        records, dist, at_sea = self._nearest(pts)
        places = []
        for r, d, sea in zip(records, dist.tolist(), at_sea.tolist(), strict=True):
            if sea:
                places.append(_AT_SEA)
                continue
            places.append(
                Place(
                    country_code=_or_none(r.get("country_code")),
                    country=_or_none(r.get("country")),
                    admin1=_or_none(r.get("state")),
                    city=_or_none(r.get("city")),
                    city_distance_km=float(d),
                )
            )
        return places

    def country_codes(self, latlon: Any) -> np.ndarray:
        """ISO alpha-2 code per point as '<U2'; "" at sea (for per-gallery-point tables)."""
        pts = validate_latlon(latlon)
        records, _, at_sea = self._nearest(pts)
        codes = np.array([r.get("country_code") or "" for r in records], dtype="<U2")
        codes[at_sea] = ""
        return codes


@cache
def _continent_table() -> dict[str, str]:
    """ISO alpha-2 -> continent (7-continent scheme) from the data file of the maintained
    ``country_converter`` package. Read with the csv module: the package's own reader turns
    Namibia's code "NA" into a missing value under some pandas versions."""
    # Located, not imported: importing the package would load pandas for one data file.
    spec = importlib.util.find_spec("country_converter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("country_converter (pip install country_converter)")
    path = Path(next(iter(spec.submodule_search_locations))) / "country_data.tsv"
    table: dict[str, str] = {}
    with path.open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            # The column is a pattern for some countries: "^GB$|^UK$".
            for code in row["ISO2"].split("|"):
                if code.strip("^$") and row["Continent_7"]:
                    table[code.strip("^$").upper()] = row["Continent_7"]
    return table


def continents(codes: Any) -> np.ndarray:
    """Continent name per ISO alpha-2 code ("Europe", "North America"...); "" for "" or an
    unknown code."""
    table = _continent_table()
    return np.array(
        [table.get(str(c).upper(), "") for c in np.asarray(codes).reshape(-1)], dtype=object
    )
