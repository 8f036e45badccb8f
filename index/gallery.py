"""Galleries: the GPS points an index searches over (H3 cell centres or points from a CSV)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from index.geo import cells_to_latlon, land_cells
from index.tables import LAT_HEADERS, LON_HEADERS, POINT_ID_HEADERS, Reason, TableError, read_table

_MAX_LISTED = 10
_NOT_LATLON = "({lat_text}, {lon_text}) is not a valid (lat, lon)"
_WORDING = {  # this reader's messages, where they differ from index.tables.WORDING
    Reason.NOT_NUMBERS: "cannot parse ({lat_text!r}, {lon_text!r}) as numbers",
    Reason.NOT_FINITE: _NOT_LATLON,
    Reason.NOT_LATLON: _NOT_LATLON,
    Reason.ID_DUPLICATE: "duplicate id {id} (first on line {first_line})",
}


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


def csv_gallery(path: Path) -> Gallery:
    """Points from a CSV with latitude/longitude columns and an optional integer `id`.

    Header names are matched case-insensitively (LAT/LON, lat/lng, latitude/longitude;
    GeoCLIP's coordinates_100K.csv uses LAT,LON). Without `id`, ids are row numbers
    from 0. Every bad row is collected, so one error lists them all (up to ten shown).
    """
    path = Path(path)
    accepted = f"latitude as one of {LAT_HEADERS} and longitude as one of {LON_HEADERS}"
    try:
        points, bad = read_table(path, ids=POINT_ID_HEADERS, parquet=False)
    except OSError as e:
        raise GalleryError(f"cannot read gallery CSV {path}: {e}") from e
    except TableError as e:
        if e.kind == "unreadable":
            raise GalleryError(f"{path}: not a readable UTF-8 CSV: {e}") from e
        if e.kind == "empty":
            raise GalleryError(f"{path}: empty file; need a header row with {accepted}") from e
        raise GalleryError(
            f"{path}: no latitude/longitude columns in header {e.header}; "
            f"need {accepted} (case-insensitive), optionally an integer 'id'"
        ) from e
    if bad:
        problems = [f"line {b.line}: {b.describe(_WORDING)}" for b in bad]
        shown = "; ".join(problems[:_MAX_LISTED])
        more = f" (first {_MAX_LISTED} shown)" if len(problems) > _MAX_LISTED else ""
        raise GalleryError(f"{path}: {len(problems)} bad row(s){more}: {shown}")
    if not len(points):
        raise GalleryError(f"{path}: no points after the header")
    latlon = np.column_stack([points.lat, points.lon]).astype(np.float64)
    id_arr = points.id if points.id is not None else np.arange(len(points))
    return Gallery(
        kind="csv",
        ids=id_arr.astype(np.int64),
        latlon=latlon,
        h3_resolution=None,
        source=f"CSV {path.name}: {len(points)} points",
    )


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
