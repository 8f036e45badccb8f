"""The id->point table of an index, and the checks of vectors and points before a build."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from index.geo import latlon_valid
from index.manifest import IndexStoreError

__all__ = ["PointTable", "VectorChunk", "check_points", "check_rows", "check_vectors"]

_COUNTRY_RE = re.compile(r"^([A-Z]{2})?$")
# Stored vectors must be unit norm (scores are cosines); allow float32 round-off and fp16 sources.
_NORM_TOL = 1e-2


@dataclass(frozen=True, eq=False)  # eq on numpy arrays is ambiguous, so identity equality
class PointTable:
    ids: np.ndarray  # int64 (n,)
    latlon: np.ndarray  # float64 (n, 2), degrees (lat, lon)
    country: np.ndarray  # '<U2' (n,), ISO alpha-2 or ""
    #: int8 (n, d) structure descriptors (reference images), or None; zero rows: unknown.
    structure: np.ndarray | None = None
    #: float32 (n,) km of ground each reference image shows, or None; nan: unknown.
    width: np.ndarray | None = None
    #: uint8 (n, d) colour thumbnails (reference images), or None; zero rows: unknown.
    colour: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class VectorChunk:
    """One chunk of a gallery that is too large to hold at once: vectors and their points."""

    vectors: np.ndarray
    points: PointTable


def check_vectors(vectors: np.ndarray) -> np.ndarray:
    """Unit float32 (n, dim) vectors, C-ordered, or IndexStoreError saying what is wrong."""
    arr = np.asarray(vectors)
    if arr.ndim != 2:
        raise IndexStoreError(f"vectors must be a 2-D (n, dim) array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise IndexStoreError(
            f"vectors are empty (shape {arr.shape}); build the gallery embeddings first"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise IndexStoreError(f"vectors must be float32, got dtype {arr.dtype}")
    # float16/float64 are cast: FAISS only stores float32 and the cast loses nothing that matters.
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise IndexStoreError(
            f"{bad} vector(s) contain NaN or inf; fix the encoder output before publishing"
        )
    norms = np.linalg.norm(arr, axis=1)
    if np.abs(norms - 1.0).max() > _NORM_TOL:
        raise IndexStoreError(
            "vectors must be unit norm (the metric is inner product = cosine); "
            f"norms range {norms.min():.4g}..{norms.max():.4g}: divide each row by its L2 norm"
        )
    return arr


def check_points(points: PointTable, n: int) -> PointTable:
    """The point table of ``n`` vectors in its stored dtypes, or IndexStoreError."""
    ids = np.asarray(points.ids)
    latlon = np.asarray(points.latlon)
    country = np.asarray(points.country)
    if len(ids) != n or len(latlon) != n or len(country) != n:
        raise IndexStoreError(
            f"point table length mismatch: {n} vectors but ids={len(ids)}, latlon={len(latlon)}, "
            f"country={len(country)}; the table must have one row per vector, in the same order"
        )
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise IndexStoreError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if ids.dtype == np.uint64 and n and ids.max() > np.iinfo(np.int64).max:
        raise IndexStoreError("ids do not fit in int64 (H3 cell ints always do)")
    if latlon.ndim != 2 or latlon.shape[1] != 2:
        raise IndexStoreError(f"latlon must have shape (n, 2) as (lat, lon), got {latlon.shape}")
    latlon = np.ascontiguousarray(latlon, dtype=np.float64)
    if not latlon_valid(latlon[:, 0], latlon[:, 1]).all():
        raise IndexStoreError(
            "latlon out of range: need finite (lat, lon) degrees with lat in [-90, 90] and "
            "lon in [-180, 180]; check the column order (lat first)"
        )
    if country.ndim != 1:
        raise IndexStoreError(f"country must be a 1-D array of strings, got shape {country.shape}")
    structure = check_rows(points.structure, n, np.int8, "structure descriptors")
    colour = check_rows(points.colour, n, np.uint8, "colour thumbnails")
    width = points.width
    if width is not None:
        width = np.asarray(width, dtype=np.float32)
        if width.shape != (n,) or (width[np.isfinite(width)] <= 0).any() or np.isinf(width).any():
            raise IndexStoreError(
                f"view widths must be one positive number (or nan: unknown) per vector, got "
                f"shape {width.shape} for {n} vectors"
            )
    bad = [c for c in np.unique(country.astype(str)) if not _COUNTRY_RE.match(c)]
    if bad:
        raise IndexStoreError(
            f"invalid country codes {bad[:5]}: use upper-case ISO alpha-2 or '' for unknown"
        )
    return PointTable(
        ids=np.ascontiguousarray(ids, dtype=np.int64),
        latlon=latlon,
        country=np.ascontiguousarray(country, dtype="<U2"),
        structure=structure,
        width=width,
        colour=colour,
    )


def check_rows(rows: np.ndarray | None, n: int, dtype: type, what: str) -> np.ndarray | None:
    """A row-aligned (n, d) array of ``dtype`` (descriptors of the ``n`` vectors), C-ordered,
    or IndexStoreError naming ``what``; None stays None."""
    if rows is None:
        return None
    arr = np.asarray(rows)
    if arr.ndim != 2 or len(arr) != n or arr.dtype != dtype:
        raise IndexStoreError(
            f"{what} must be a {np.dtype(dtype).name} (n, d) array with one row per vector, "
            f"got {arr.dtype} {arr.shape} for {n} vectors"
        )
    return np.ascontiguousarray(arr)
