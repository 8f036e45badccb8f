import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index.tables import (
    ID_COLUMNS,
    IMAGE_COLUMNS,
    URI_COLUMNS,
    WIDTH_COLUMNS,
    WORDING,
    Reason,
    TableError,
    find_column,
    read_table,
)


def _csv(tmp_path, text, name="t.csv", bom=False):
    path = tmp_path / name
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return path


def test_find_column_is_case_insensitive_and_the_first_name_wins():
    header = ["Name", " LONGITUDE ", "Lng", "LAT"]
    assert find_column(header, ("lat", "latitude")) == 3
    assert find_column(header, ("lon", "lng", "long", "longitude")) == 2  # lng before longitude
    assert find_column(header, ("id",)) is None


def test_csv_with_bom_and_any_case_of_the_headers(tmp_path):
    path = _csv(
        tmp_path, "Image,LATITUDE,Lng,ID\na.jpg,48.85,2.35,7\n b.jpg ,-33.9,151.2,3\n", bom=True
    )
    rows, bad = read_table(path, text=IMAGE_COLUMNS, ids=ID_COLUMNS)
    assert bad == []
    assert rows.header == ["Image", "LATITUDE", "Lng", "ID"]
    assert rows.text == ["a.jpg", "b.jpg"]  # stripped
    assert rows.id.dtype == np.int64 and rows.id.tolist() == [7, 3]
    assert rows.lat.dtype == np.float64 and rows.lat.tolist() == [48.85, -33.9]
    assert rows.lon.tolist() == [2.35, 151.2]
    assert rows.line.tolist() == [2, 3] and rows.row.tolist() == [1, 2] and len(rows) == 2


def test_optional_columns(tmp_path):
    rows, bad = read_table(_csv(tmp_path, "lat,lon\n1,2\n"), ids=("id",), widths=WIDTH_COLUMNS)
    assert bad == [] and rows.id is None and rows.text == [""] and rows.width is None


def test_view_widths_blank_is_unknown_and_a_bad_width_is_a_bad_row(tmp_path):
    text = "lat,lon,width_km\n1,2,350.5\n3,4,\n5,6\n7,8,-1\n9,10,wide\n11,12,inf\n13,14,0\n"
    rows, bad = read_table(_csv(tmp_path, text), widths=WIDTH_COLUMNS)
    assert rows.lat.tolist() == [1, 3, 5]  # a row may leave the width out
    assert rows.width[0] == 350.5 and np.isnan(rows.width[1:]).all()
    assert [(b.line, b.reason) for b in bad] == [(n, Reason.BAD_WIDTH) for n in (5, 6, 7, 8)]
    assert bad[1].describe() == "width_km 'wide' is not a positive number of km"


def test_bad_rows_with_their_lines_and_reasons(tmp_path):
    text = (
        "id,lat,lon,uri\n"
        "1,10,20,a.jpg\n"  # line 2: good
        "2,abc,1,b.jpg\n"  # 3: not numbers
        "3,nan,1,c.jpg\n"  # 4: nan is a number, but not finite
        "4,95,0,d.jpg\n"  # 5: latitude out of range
        "5,1,1,  \n"  # 6: empty text
        "x,1,1,f.jpg\n"  # 7: id not an integer
        "-2,1,1,g.jpg\n"  # 8: negative id
        "1,1,1,h.jpg\n"  # 9: duplicate of line 2
        "6,1\n"  # 10: too few columns
        "7,1,2,i.jpg\n"  # 11: good
    )
    rows, bad = read_table(_csv(tmp_path, text), text=URI_COLUMNS, ids=ID_COLUMNS)
    assert rows.line.tolist() == [2, 11] and rows.id.tolist() == [1, 7]
    assert [(b.line, b.row, b.reason) for b in bad] == [
        (3, 2, Reason.NOT_NUMBERS),
        (4, 3, Reason.NOT_FINITE),
        (5, 4, Reason.NOT_LATLON),
        (6, 5, Reason.EMPTY_TEXT),
        (7, 6, Reason.ID_NOT_INTEGER),
        (8, 7, Reason.ID_NEGATIVE),
        (9, 8, Reason.ID_DUPLICATE),
        (10, 9, Reason.COLUMNS),
    ]
    not_numbers, not_finite, _, _, not_int, negative, duplicate, short = bad
    assert (not_numbers.lat_text, not_numbers.lon_text) == ("abc", "1")
    assert math.isnan(not_numbers.lat) and not_numbers.lon == 1.0
    assert math.isnan(not_finite.lat)
    assert not_int.id_text == "x" and not_int.id == -1 and negative.id == -2
    assert (duplicate.id, duplicate.first_line, duplicate.first_row) == (1, 2, 1)
    assert (short.cells, short.need) == (2, 4)
    # The reader's own words, and a caller's where it has its own.
    assert [b.describe() for b in bad] == [
        "latitude/longitude abc, 1 are not numbers",
        "(nan, 1.0) is not a valid (lat, lon)",
        "(95.0, 0.0) is not a valid (lat, lon)",
        "empty text",
        "id 'x' is not an integer",
        "id -2 is negative",
        "duplicate id 1 (first on row 1)",
        "expected at least 4 columns, got 2",
    ]
    wording = {Reason.COLUMNS: "{cells} of {width} columns", Reason.EMPTY_TEXT: "no image"}
    assert short.describe(wording, width=4) == "2 of 4 columns"
    assert bad[3].describe(wording) == "no image"
    assert bad[0].describe(wording) == WORDING[Reason.NOT_NUMBERS].format(**vars(bad[0]))


def test_a_bad_row_does_not_claim_its_id(tmp_path):
    rows, bad = read_table(_csv(tmp_path, "id,lat,lon\n1,95,0\n1,1,1\n"), ids=("id",))
    assert rows.id.tolist() == [1] and [b.reason for b in bad] == [Reason.NOT_LATLON]


def test_blank_lines_are_skipped_and_lines_are_physical(tmp_path):
    text = 'lat,lon,name\n\n1,2,"two\nlines"\n , ,\n,,\n3,4,x\n'
    rows, bad = read_table(_csv(tmp_path, text))
    assert bad == []
    assert rows.line.tolist() == [4, 7]  # the quoted newline counts; the header is line 1
    # Empty lines are no rows; lines of blank cells are rows, skipped.
    assert rows.row.tolist() == [1, 4]


def test_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    table = pa.table(
        {
            "URL": ["a.jpg", None, "c.jpg"],
            "lat": [10.5, 1.0, None],
            "Longitude": [20.0, 2.0, 3.0],
            "photo_id": [5, 6, 7],
        }
    )
    pq.write_table(table, path)
    rows, bad = read_table(path, text=URI_COLUMNS, ids=ID_COLUMNS)
    assert rows.text == ["a.jpg"] and rows.id.tolist() == [5]
    assert rows.line.tolist() == [2] and rows.row.tolist() == [1]
    assert rows.header == ["URL", "lat", "Longitude", "photo_id"]
    assert [(b.line, b.row, b.reason) for b in bad] == [
        (3, 2, Reason.EMPTY_TEXT),
        (4, 3, Reason.NOT_NUMBERS),
    ]
    assert bad[1].lat_text is None and bad[1].id_text == "7"  # numbers come as text
    # Read as a CSV where the caller says so: a Parquet file is no UTF-8 text.
    with pytest.raises(TableError) as err:
        read_table(path, parquet=False)
    assert err.value.kind == "unreadable"


@pytest.mark.parametrize(
    ("text", "kind", "header"),
    [
        ("", "empty", []),
        ("\ufeff", "empty", []),
        ("\nlat,lon\n", "columns", []),
        ("name,lat\nx,1\n", "columns", ["name", "lat"]),
        ("lat,lon\n1,2\n", "columns", ["lat", "lon"]),  # no image column
    ],
)
def test_tables_that_cannot_be_read(tmp_path, text, kind, header):
    with pytest.raises(TableError) as err:
        read_table(_csv(tmp_path, text), text=IMAGE_COLUMNS)
    assert err.value.kind == kind and err.value.header == header


def test_unreadable_files(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("lat,lon\n1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(TableError, match="can't decode") as err:
        read_table(latin)
    assert err.value.kind == "unreadable"
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(TableError, match="Parquet") as err:
        read_table(broken)
    assert err.value.kind == "unreadable"
    with pytest.raises(FileNotFoundError):
        read_table(tmp_path / "missing.csv")


def test_a_header_only_table_has_no_rows(tmp_path):
    rows, bad = read_table(_csv(tmp_path, "lat,lon,id\n"), ids=("id",))
    assert bad == [] and len(rows) == 0 and rows.lat.dtype == np.float64
    assert rows.id is not None and rows.id.dtype == np.int64
