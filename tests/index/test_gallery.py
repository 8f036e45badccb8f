import numpy as np
import pytest

from index.gallery import GalleryError, csv_gallery, encode_gallery, h3_gallery
from index.geo import cells_to_latlon, land_cells


def _write(tmp_path, text, name="points.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_lat_lon_uppercase(tmp_path):
    g = csv_gallery(_write(tmp_path, "LAT,LON\n48.85,2.35\n-33.9,151.2\n"))
    assert g.kind == "csv" and g.h3_resolution is None
    assert g.ids.dtype == np.int64 and g.ids.tolist() == [0, 1]
    assert g.latlon.dtype == np.float64
    np.testing.assert_array_equal(g.latlon, [[48.85, 2.35], [-33.9, 151.2]])
    assert "points.csv" in g.source


def test_csv_lat_lng_with_ids_and_extra_columns(tmp_path):
    text = "name,Lng,id,Lat\nparis,2.35,10,48.85\n\nsydney,151.2,7,-33.9\n"
    g = csv_gallery(_write(tmp_path, text))
    assert g.ids.tolist() == [10, 7]
    np.testing.assert_array_equal(g.latlon, [[48.85, 2.35], [-33.9, 151.2]])


def test_csv_latitude_longitude_with_bom(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffLatitude,Longitude\n1.5,2.5\n".encode())
    assert csv_gallery(path).latlon.tolist() == [[1.5, 2.5]]


def test_csv_bad_rows_report_file_line_numbers(tmp_path):
    text = "lat,lon\n10,20\nabc,1\n95,0\n\n1,nan\n5,5\n0,-181\n"
    with pytest.raises(GalleryError) as err:
        csv_gallery(_write(tmp_path, text))
    msg = str(err.value)
    assert "4 bad row(s)" in msg
    assert "line 3:" in msg and "line 4:" in msg and "line 6:" in msg and "line 8:" in msg
    assert "line 2:" not in msg and "line 7:" not in msg


def test_csv_lists_at_most_ten_problems(tmp_path):
    text = "lat,lon\n" + "x,y\n" * 25
    with pytest.raises(GalleryError) as err:
        csv_gallery(_write(tmp_path, text))
    msg = str(err.value)
    assert "25 bad row(s)" in msg and "line 11:" in msg and "line 12:" not in msg


def test_csv_duplicate_and_bad_ids(tmp_path):
    with pytest.raises(GalleryError, match=r"line 3: duplicate id 1 \(first on line 2\)"):
        csv_gallery(_write(tmp_path, "id,lat,lon\n1,0,0\n1,1,1\n"))
    with pytest.raises(GalleryError, match="line 2: id 'x' is not an integer"):
        csv_gallery(_write(tmp_path, "id,lat,lon\nx,0,0\n"))


@pytest.mark.parametrize("text", ["", "x,y\n1,2\n", "lat,height\n1,2\n"])
def test_csv_without_coordinate_columns(tmp_path, text):
    with pytest.raises(GalleryError, match="longitude as one of"):
        csv_gallery(_write(tmp_path, text))


def test_csv_header_only(tmp_path):
    with pytest.raises(GalleryError, match="no points"):
        csv_gallery(_write(tmp_path, "lat,lon\n"))


def test_h3_gallery():
    g = h3_gallery(1)
    assert g.kind == "h3" and g.h3_resolution == 1
    np.testing.assert_array_equal(g.ids, land_cells(1))
    np.testing.assert_array_equal(g.latlon, cells_to_latlon(g.ids))
    assert len(h3_gallery(1, land_only=False).ids) == 842


def test_encode_gallery_chunks_and_order(tmp_path):
    n = 10
    rows = "\n".join(f"{i},{-i}" for i in range(n))
    g = csv_gallery(_write(tmp_path, "lat,lon\n" + rows + "\n"))
    calls = []

    def embed(chunk):
        calls.append(chunk.shape)
        assert chunk.dtype == np.float32
        return np.column_stack([chunk[:, 0], chunk[:, 1], chunk[:, 0] * 2])

    out = encode_gallery(g, embed, dim=3, batch_size=4, progress=False)
    assert calls == [(4, 2), (4, 2), (2, 2)]
    assert out.dtype == np.float32 and out.shape == (n, 3)
    np.testing.assert_array_equal(out[:, 0], np.arange(n))
    np.testing.assert_array_equal(out[:, 2], 2 * np.arange(n))


def test_encode_gallery_rejects_wrong_shape(tmp_path):
    g = csv_gallery(_write(tmp_path, "lat,lon\n1,2\n"))
    with pytest.raises(ValueError, match="expected"):
        encode_gallery(g, lambda x: np.zeros((len(x), 2)), dim=3, progress=False)
