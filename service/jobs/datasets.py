"""Labelled image lists: CSV files of (image path, lat, lon), checked row by row."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from index.gallery import LAT_HEADERS, LON_HEADERS, find_column
from index.geo import latlon_valid
from service.errors import GeolocError

IMAGE_COLUMNS = ("image", "path", "image_path", "file", "filename", "img_path", "img_id")


class DatasetError(GeolocError):
    type = "invalid-dataset"
    title = "Invalid dataset file"


@dataclass(frozen=True)
class LabelledImage:
    line: int
    path: Path
    lat: float
    lon: float


def read_labelled_csv(
    path: str | Path, *, check_files: bool = True
) -> tuple[list[LabelledImage], list[str]]:
    """Rows that are usable, and one message per row that is not ("line N: why").

    Image paths are resolved against the CSV's directory.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise DatasetError(f"{path} is empty; expected a header such as image,lat,lon")
        ci, cla, clo = (find_column(header, c) for c in (IMAGE_COLUMNS, LAT_HEADERS, LON_HEADERS))
        if ci is None or cla is None or clo is None:
            raise DatasetError(
                f"{path}: header {header} lacks an image column ({'/'.join(IMAGE_COLUMNS)}), "
                f"a latitude column ({'/'.join(LAT_HEADERS)}) or a longitude column "
                f"({'/'.join(LON_HEADERS)})"
            )
        rows: list[LabelledImage] = []
        problems: list[str] = []
        for line, rec in enumerate(reader, start=2):
            if not rec or all(not c.strip() for c in rec):
                continue
            if len(rec) <= max(ci, cla, clo):
                problems.append(f"{path}:{line}: expected {len(header)} columns, got {len(rec)}")
                continue
            try:
                lat, lon = float(rec[cla]), float(rec[clo])
            except ValueError:
                problems.append(
                    f"{path}:{line}: latitude/longitude '{rec[cla]}', '{rec[clo]}' are not numbers"
                )
                continue
            if not latlon_valid(lat, lon):
                problems.append(f"{path}:{line}: ({lat}, {lon}) is not a valid (lat, lon)")
                continue
            img = (path.parent / rec[ci].strip()) if rec[ci].strip() else None
            if img is None:
                problems.append(f"{path}:{line}: empty image path")
                continue
            if check_files and not img.is_file():
                problems.append(f"{path}:{line}: image {img} does not exist")
                continue
            rows.append(LabelledImage(line, img, lat, lon))
    return rows, problems
