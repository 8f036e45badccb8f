"""Tables of points: a CSV or Parquet file with a latitude, a longitude and, as asked, a text
column (an image path or URI) and an integer id column, read and checked row by row.

The one reader of the gallery CSVs (index.gallery), the labelled image lists
(service.jobs.datasets) and the reference tables (service.jobs.references): columns are found
by header name, every row that cannot be used comes back with its reason, and each caller
words the reasons its own way (RowProblem.describe).
"""

from __future__ import annotations

import csv
import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from index.geo import latlon_valid

# Header names, matched case-insensitively; the first one present wins.
LAT_HEADERS = ("lat", "latitude")
LON_HEADERS = ("lon", "lng", "long", "longitude")
POINT_ID_HEADERS = ("id",)  # a gallery point's id
IMAGE_COLUMNS = ("image", "path", "image_path", "file", "filename", "img_path", "img_id")
URI_COLUMNS = ("uri", "url", *IMAGE_COLUMNS)  # a reference image: a path or a URI
ID_COLUMNS = ("id", "image_id", "photo_id")  # a reference image's id
#: A reference image's view width: the ground it shows, in km (optional; blank: unknown).
WIDTH_COLUMNS = ("width_km",)
PARQUET_SUFFIXES = (".parquet", ".pq")  # read_table reads any other file as a CSV


class TableError(ValueError):
    """A table that cannot be read at all. ``kind``: "unreadable" (not a UTF-8 CSV or a
    Parquet table; str() is the parser's message), "empty" (a CSV without a header row) or
    "columns" (no latitude, longitude or text column in ``header``)."""

    def __init__(
        self, kind: Literal["unreadable", "empty", "columns"], detail: str, header: list[str]
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.header = header


class Reason(enum.Enum):
    """Why a row cannot be used, in the order the checks run."""

    COLUMNS = "too few columns"
    NOT_NUMBERS = "latitude/longitude are not numbers"
    NOT_FINITE = "latitude/longitude are nan or infinite"
    NOT_LATLON = "not a valid (lat, lon)"
    EMPTY_TEXT = "empty text"
    ID_NOT_INTEGER = "id is not an integer"
    ID_NEGATIVE = "id is negative"
    ID_DUPLICATE = "duplicate id"
    BAD_WIDTH = "width is not a positive number"


# The reasons in words, as str.format templates of RowProblem's fields.
WORDING = {
    Reason.COLUMNS: "expected at least {need} columns, got {cells}",
    Reason.NOT_NUMBERS: "latitude/longitude {lat_text}, {lon_text} are not numbers",
    Reason.NOT_FINITE: "({lat}, {lon}) is not a valid (lat, lon)",
    Reason.NOT_LATLON: "({lat}, {lon}) is not a valid (lat, lon)",
    Reason.EMPTY_TEXT: "empty text",
    Reason.ID_NOT_INTEGER: "id {id_text!r} is not an integer",
    Reason.ID_NEGATIVE: "id {id} is negative",
    Reason.ID_DUPLICATE: "duplicate id {id} (first on row {first_row})",
    Reason.BAD_WIDTH: "width_km {width_text!r} is not a positive number of km",
}


@dataclass(frozen=True)
class RowProblem:
    """A row that cannot be used, with what a caller needs to say why."""

    line: int  # physical line in a CSV (the header is line 1); data row + 1 in Parquet
    row: int  # 1-based data row (the header and empty lines are not rows)
    reason: Reason
    cells: int  # how many cells the row has
    need: int  # how many it needs: the position of the last column read, + 1
    lat_text: str | None  # cells as read; None: null in Parquet or missing
    lon_text: str | None
    text: str  # the text column, stripped ("" without one)
    id_text: str | None
    lat: float  # nan where not a number
    lon: float
    id: int  # the id, -1 where not an integer
    first_line: int  # ID_DUPLICATE: the line and row where the id was first (0 otherwise)
    first_row: int
    width_text: str | None = None  # the width cell as read (None: no such column or null)

    def describe(self, wording: Mapping[Reason, str] | None = None, **extra: object) -> str:
        """Why the row is bad: the caller's ``wording`` of the reason, else WORDING's,
        formatted with these fields (and ``extra``)."""
        template = (wording or {}).get(self.reason) or WORDING[self.reason]
        return template.format(**vars(self), **extra)


@dataclass(frozen=True)
class Rows:
    """The rows that passed every check, in file order."""

    header: list[str]
    line: np.ndarray  # int64, as RowProblem.line
    row: np.ndarray  # int64, as RowProblem.row
    lat: np.ndarray  # float64
    lon: np.ndarray  # float64
    text: list[str]  # the text column, stripped ("" each without one)
    id: np.ndarray | None  # int64; None without an id column
    width: np.ndarray | None = None  # float64 km, nan where blank; None without the column

    def __len__(self) -> int:
        return len(self.row)


class _Cells(NamedTuple):
    """The cells read, column by column: plain lists of strings and numbers, which the
    garbage collector does not scan (a list per row of a large table keeps it busy)."""

    line: list[int]  # as RowProblem.line
    row: list[int]  # as RowProblem.row
    width: list[int]  # how many cells the row has
    values: list[list[str | None]]  # per column asked for: its cells (None: missing or null)


_Read = Callable[[list[int | None]], _Cells]  # the cells of these columns


def find_column(header: list[str], names: tuple[str, ...]) -> int | None:
    """Position of the first of ``names`` in a header (case-insensitive), or None."""
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def read_table(
    path: str | Path,
    *,
    text: tuple[str, ...] = (),
    ids: tuple[str, ...] = (),
    widths: tuple[str, ...] = (),
    parquet: bool = True,
) -> tuple[Rows, list[RowProblem]]:
    """Rows of a CSV (UTF-8, an optional byte-order mark, every cell as text) or Parquet
    table with a latitude and a longitude column (LAT_HEADERS, LON_HEADERS), a non-empty
    text column named as one of ``text`` (if given) and an optional column of non-negative,
    unique integer ids named as one of ``ids`` and an optional column of positive numbers
    named as one of ``widths`` (blank: unknown). Lines of blank cells in a CSV are skipped.
    A file named *.parquet or *.pq is read as Parquet unless ``parquet`` is False.

    Returns the good rows and one RowProblem per bad row, both in file order. Raises
    OSError where the file cannot be opened and TableError where it is no table of points.
    """
    path = Path(path)
    wanted = (LAT_HEADERS, LON_HEADERS, text, ids, widths)
    parquet = parquet and path.suffix.lower() in PARQUET_SUFFIXES
    header, read = _open_parquet(path) if parquet else _open_csv(path)
    cols = [find_column(header, w) if w else None for w in wanted]
    if cols[0] is None or cols[1] is None or (text and cols[2] is None):
        raise TableError("columns", f"{path}: no latitude, longitude or text column", header)
    has_id, has_width = cols[3] is not None, cols[4] is not None
    need = max(c for c in cols[:4] if c is not None) + 1  # a width cell may be left out
    found = read(cols)
    lat_f, lon_f = ([_float(t) for t in v] for v in found.values[:2])
    lat, lon = np.array(lat_f, dtype=np.float64), np.array(lon_f, dtype=np.float64)  # None: nan
    width = np.array([_float(t) for t in found.values[4]], dtype=np.float64)  # blank: nan
    # All rows at once (one call per row is slow):
    finite = (np.isfinite(lat) & np.isfinite(lon)).tolist()
    on_earth = latlon_valid(lat, lon).tolist()
    keep: list[int] = []
    names: list[str] = []
    values: list[int] = []
    bad: list[RowProblem] = []
    seen: dict[int, tuple[int, int]] = {}  # id -> (line, row) of the good row with it
    for i, (line, row, cells, lat_text, lon_text, text_cell, id_text, width_text) in enumerate(
        zip(found.line, found.row, found.width, *found.values, strict=True)
    ):
        name = (text_cell or "").strip()
        value = -1
        if cells < need:
            reason: Reason | None = Reason.COLUMNS
        elif lat_f[i] is None or lon_f[i] is None:
            reason = Reason.NOT_NUMBERS
        elif not finite[i]:
            reason = Reason.NOT_FINITE
        elif not on_earth[i]:
            reason = Reason.NOT_LATLON
        elif text and not name:
            reason = Reason.EMPTY_TEXT
        elif (width_text or "").strip() and not 0 < width[i] < np.inf:
            reason = Reason.BAD_WIDTH
        elif has_id:
            reason, value = _check_id(id_text, seen)
        else:
            reason = None
        if reason is None:
            seen[value] = (line, row)
            keep.append(i)
            names.append(name)
            values.append(value)
            continue
        first = seen[value] if reason is Reason.ID_DUPLICATE else (0, 0)
        bad.append(
            RowProblem(
                line,
                row,
                reason,
                cells,
                need,
                lat_text,
                lon_text,
                name,
                id_text,
                float(lat[i]),
                float(lon[i]),
                value,
                *first,
                width_text,
            )
        )
    rows = Rows(
        header=header,
        line=np.array(found.line, dtype=np.int64)[keep],
        row=np.array(found.row, dtype=np.int64)[keep],
        lat=lat[keep],
        lon=lon[keep],
        text=names,
        id=np.array(values, dtype=np.int64) if has_id else None,
        width=width[keep] if has_width else None,
    )
    return rows, bad


def _open_csv(path: Path) -> tuple[list[str], _Read]:
    lines = _csv_lines(path)
    first = next(lines, None)
    if first is None:
        raise TableError("empty", f"{path}: no header row", [])

    def read(cols: list[int | None]) -> _Cells:
        found = _Cells([], [], [], [])
        flat: list[str | None] = []  # the cells read, row after row
        row = 0
        for line, cells in lines:
            if not cells:
                continue  # an empty line is no row
            row += 1
            if "".join(cells).strip():  # a line of blank cells is no point
                n = len(cells)
                found.line.append(line)
                found.row.append(row)
                found.width.append(n)
                flat.extend(cells[c] if c is not None and c < n else None for c in cols)
        found.values.extend(flat[k :: len(cols)] for k in range(len(cols)))
        return found

    return first[1], read


def _csv_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(physical line, cells) of each CSV record; the header is line 1."""
    try:
        # utf-8-sig: spreadsheets often write a byte-order mark before the header.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            for cells in reader:
                yield reader.line_num, cells
    except (csv.Error, UnicodeDecodeError) as exc:
        raise TableError("unreadable", str(exc), []) from exc


def _open_parquet(path: Path) -> tuple[list[str], _Read]:
    import pyarrow as pa  # here: the CSV readers start without it
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as exc:
        raise TableError("unreadable", str(exc), []) from exc
    n = table.num_rows

    def text(col: int | None) -> list[str | None]:
        if col is None:
            return [None] * n
        values = table.column(col).combine_chunks()
        if values.type != pa.string():
            values = pc.cast(values, pa.string(), safe=False)
        return values.to_pylist()

    def read(cols: list[int | None]) -> _Cells:
        try:
            values = [text(c) for c in cols]
        except pa.ArrowException as exc:
            raise TableError("unreadable", str(exc), table.column_names) from exc
        rows = list(range(1, n + 1))
        return _Cells([r + 1 for r in rows], rows, [table.num_columns] * n, values)

    return table.column_names, read


def _float(text: str | None) -> float | None:
    """The number in a cell (as Python reads it: "nan" and "inf" are numbers), or None."""
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _check_id(text: str | None, seen: Mapping[int, object]) -> tuple[Reason | None, int]:
    """(why the id cannot be used or None, the id or -1)."""
    try:
        value = int(str(text).strip())
    except ValueError:
        return Reason.ID_NOT_INTEGER, -1
    if value < 0:
        return Reason.ID_NEGATIVE, value
    return (Reason.ID_DUPLICATE if value in seen else None), value
