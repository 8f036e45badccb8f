"""Labelled image lists: CSV files of (image path, lat, lon), checked row by row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from index.tables import IMAGE_COLUMNS, LAT_HEADERS, LON_HEADERS, Reason, TableError, read_table
from service.errors import GeolocError

_WORDING = {  # this reader's messages, where they differ from index.tables.WORDING
    Reason.COLUMNS: "expected {columns} columns, got {cells}",
    Reason.NOT_NUMBERS: "latitude/longitude '{lat_text}', '{lon_text}' are not numbers",
    Reason.EMPTY_TEXT: "empty image path",
}


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
    try:
        table, bad = read_table(path, text=IMAGE_COLUMNS, parquet=False)
    except TableError as exc:
        if exc.kind == "unreadable":
            raise DatasetError(f"{path}: not a readable UTF-8 CSV: {exc}") from exc
        if not exc.header:
            raise DatasetError(f"{path} is empty; expected a header such as image,lat,lon") from exc
        raise DatasetError(
            f"{path}: header {exc.header} lacks an image column ({'/'.join(IMAGE_COLUMNS)}), "
            f"a latitude column ({'/'.join(LAT_HEADERS)}) or a longitude column "
            f"({'/'.join(LON_HEADERS)})"
        ) from exc
    problems = [(b.line, b.describe(_WORDING, columns=len(table.header))) for b in bad]
    rows: list[LabelledImage] = []
    for line, name, lat, lon in zip(
        table.line.tolist(), table.text, table.lat.tolist(), table.lon.tolist(), strict=True
    ):
        img = path.parent / name
        if check_files and not img.is_file():
            problems.append((line, f"image {img} does not exist"))
        else:
            rows.append(LabelledImage(line, img, lat, lon))
    problems.sort(key=lambda p: p[0])
    return rows, [f"{path}:{line}: {why}" for line, why in problems]
