"""Galleries: the GPS points an index searches over (H3 cell centres or points from a CSV)."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from index.geo import cells_to_latlon, land_cells, latlon_valid

LAT_HEADERS = ("lat", "latitude")
LON_HEADERS = ("lon", "lng", "long", "longitude")
ID_HEADER = "id"
_MAX_LISTED = 10


class GalleryError(ValueError):
    """A gallery source that cannot be read (bad CSV, bad rows)."""


@dataclass(frozen=True)
class Gallery:
    kind: str  # "h3" | "csv" | "images"
    ids: np.ndarray  # int64 (n,), FAISS ids
    latlon: np.ndarray  # float64 (n, 2)
    h3_resolution: int | None
    source: str  # for people: where the points came from

    def __len__(self) -> int:
        return len(self.ids)


def h3_gallery(res: int, land_only: bool = True) -> Gallery:
    """Centres of every H3 cell at `res` (only cells touching land, by default)."""
    cells = land_cells(res, land_only=land_only)
    what = "cells touching land (GSHHG, coasts kept)" if land_only else "cells, land and sea"
    return Gallery(
        kind="h3",
        ids=np.array(cells, dtype=np.int64),
        latlon=cells_to_latlon(cells),
        h3_resolution=int(res),
        source=f"H3 res {res}: centres of all {len(cells)} {what}",
    )


def find_column(header: list[str], names: tuple[str, ...]) -> int | None:
    """Position of the first of ``names`` in a CSV header (case-insensitive), or None."""
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def csv_gallery(path: Path) -> Gallery:
    """Points from a CSV with latitude/longitude columns and an optional integer `id`.

    Header names are matched case-insensitively (LAT/LON, lat/lng, latitude/longitude;
    GeoCLIP's coordinates_100K.csv uses LAT,LON). Without `id`, ids are row numbers
    from 0. Every bad row is collected, so one error lists them all (up to ten shown).
    """
    path = Path(path)
    accepted = f"latitude as one of {LAT_HEADERS} and longitude as one of {LON_HEADERS}"
    try:
        # utf-8-sig: spreadsheets often write a byte-order mark before the header.
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise GalleryError(f"{path}: empty file; need a header row with {accepted}")
            i_lat = find_column(header, LAT_HEADERS)
            i_lon = find_column(header, LON_HEADERS)
            i_id = find_column(header, (ID_HEADER,))
            if i_lat is None or i_lon is None:
                raise GalleryError(
                    f"{path}: no latitude/longitude columns in header {header}; "
                    f"need {accepted} (case-insensitive), optionally an integer 'id'"
                )
            lats: list[float] = []
            lons: list[float] = []
            ids: list[int] = []
            problems: list[str] = []
            seen: dict[int, int] = {}
            need = max(i_lat, i_lon, -1 if i_id is None else i_id) + 1
            for row in reader:
                line = reader.line_num  # physical line in the file; the header is line 1
                if not any(cell.strip() for cell in row):
                    continue  # blank lines are not points
                problem = None
                if len(row) < need:
                    problem = f"expected at least {need} columns, got {len(row)}"
                else:
                    problem, lat, lon = _parse_point(row[i_lat], row[i_lon])
                    if problem is None and i_id is not None:
                        try:
                            pid = int(row[i_id].strip())
                        except ValueError:
                            problem = f"id {row[i_id]!r} is not an integer"
                        else:
                            if pid < 0:
                                problem = f"id {pid} is negative"
                            elif pid in seen:
                                problem = f"duplicate id {pid} (first on line {seen[pid]})"
                            else:
                                seen[pid] = line
                                ids.append(pid)
                if problem is not None:
                    problems.append(f"line {line}: {problem}")
                    continue
                lats.append(lat)
                lons.append(lon)
    except OSError as e:
        raise GalleryError(f"cannot read gallery CSV {path}: {e}") from e
    except (csv.Error, UnicodeDecodeError) as e:
        raise GalleryError(f"{path}: not a readable UTF-8 CSV: {e}") from e

    if problems:
        shown = "; ".join(problems[:_MAX_LISTED])
        more = f" (first {_MAX_LISTED} shown)" if len(problems) > _MAX_LISTED else ""
        raise GalleryError(f"{path}: {len(problems)} bad row(s){more}: {shown}")
    if not lats:
        raise GalleryError(f"{path}: no points after the header")
    latlon = np.column_stack([np.array(lats), np.array(lons)]).astype(np.float64)
    id_arr = np.array(ids, dtype=np.int64) if i_id is not None else np.arange(len(lats))
    return Gallery(
        kind="csv",
        ids=id_arr.astype(np.int64),
        latlon=latlon,
        h3_resolution=None,
        source=f"CSV {path.name}: {len(lats)} points",
    )


def _parse_point(lat_text: str, lon_text: str) -> tuple[str | None, float, float]:
    """(problem or None, lat, lon) for one row."""
    try:
        lat, lon = float(lat_text), float(lon_text)
    except ValueError:
        return f"cannot parse ({lat_text!r}, {lon_text!r}) as numbers", 0.0, 0.0
    if not latlon_valid(lat, lon):
        return f"({lat_text}, {lon_text}) is not a valid (lat, lon)", 0.0, 0.0
    return None, lat, lon


def encode_gallery(
    gallery: Gallery,
    embed: Callable[[np.ndarray], np.ndarray],
    dim: int,
    batch_size: int = 4096,
    progress: bool = True,
) -> np.ndarray:
    """Embed every gallery point: (n, dim) float32, rows in gallery order.

    `embed` gets (b, 2) float32 (lat, lon) chunks and must return (b, dim).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    n = len(gallery.latlon)
    out = np.empty((n, dim), dtype=np.float32)  # preallocated: no list of chunks to concatenate
    with tqdm(
        total=n,
        desc=f"encoding {gallery.kind} gallery",
        unit="pt",
        unit_scale=True,
        disable=not progress,
    ) as bar:
        for start in range(0, n, batch_size):
            chunk = np.ascontiguousarray(gallery.latlon[start : start + batch_size], np.float32)
            emb = np.asarray(embed(chunk))
            if emb.shape != (len(chunk), dim):
                raise ValueError(
                    f"embed returned shape {emb.shape} for {len(chunk)} points; "
                    f"expected ({len(chunk)}, {dim})"
                )
            out[start : start + len(chunk)] = emb
            bar.update(len(chunk))
    return out
