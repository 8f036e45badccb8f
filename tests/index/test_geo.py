import math

import h3
import numpy as np
import pytest

from index.geo import (
    EARTH_RADIUS_KM,
    BBox,
    GeoError,
    all_cells,
    cell_area_km2,
    cell_to_center_child,
    cell_to_children,
    cell_to_int,
    cells_to_geojson,
    cells_to_latlon,
    geoscore,
    haversine_km,
    int_to_cell,
    is_land,
    land_cells,
    latlon_to_cells,
    mean_latlon,
    pairwise_km,
    validate_latlon,
)

PARIS = (48.8566, 2.3522)
LONDON = (51.5074, -0.1278)


def test_haversine_known_values():
    assert haversine_km(*PARIS, *LONDON) == pytest.approx(343.5, abs=1.0)
    assert haversine_km(0.0, 0.0, 0.0, 180.0) == pytest.approx(math.pi * EARTH_RADIUS_KM)
    assert haversine_km(10.0, 20.0, -10.0, -160.0) == pytest.approx(math.pi * EARTH_RADIUS_KM)
    assert haversine_km(*PARIS, *PARIS) == 0.0


def test_haversine_broadcasts_and_pairwise():
    d = haversine_km(np.array([PARIS[0], 0.0]), np.array([PARIS[1], 0.0]), LONDON[0], LONDON[1])
    assert d.shape == (2,)
    m = pairwise_km(np.array([PARIS, LONDON]), np.array([LONDON, PARIS, (0.0, 0.0)]))
    assert m.shape == (2, 3)
    assert m[0, 0] == pytest.approx(m[1, 1]) == pytest.approx(343.5, abs=1.0)
    assert m[0, 1] == 0.0


def test_mean_latlon_on_the_sphere():
    # Across the antimeridian: the mean of 179 E and 179 W is on it, not at 0.
    lat, lon = mean_latlon(np.array([[10.0, 179.0], [10.0, -179.0]]), np.ones(2))
    assert lat == pytest.approx(10.0, abs=0.01) and abs(lon) == pytest.approx(180.0)
    # Weights pull it; the scale of the weights does not matter.
    pts = np.array([[0.0, 0.0], [0.0, 10.0]])
    assert mean_latlon(pts, np.array([3.0, 1.0])) == pytest.approx([0.0, 2.5], abs=0.05)
    assert mean_latlon(pts, np.array([30.0, 10.0])) == pytest.approx(mean_latlon(pts, [3, 1]))


def test_geoscore():
    assert geoscore(0.0) == 5000.0
    assert geoscore(1492.7) == pytest.approx(5000.0 / math.e)
    assert np.all(np.diff(geoscore(np.array([0.0, 10.0, 1000.0]))) < 0)


def test_validate_latlon():
    assert validate_latlon((10, 20)).shape == (1, 2)
    assert validate_latlon([[90, 180], [-90, -180]]).dtype == np.float64
    for bad in ([[91, 0]], [[0, 180.5]], [[np.nan, 0]], [[0, np.inf]], [[1, 2, 3]]):
        with pytest.raises(GeoError):
            validate_latlon(bad)


def test_cell_int_str_round_trip():
    cell = h3.latlng_to_cell(*PARIS, 7)
    value = cell_to_int(cell)
    assert isinstance(value, int) and value > 0
    assert int_to_cell(value) == cell
    assert np.int64(value) == value  # fits a FAISS id
    with pytest.raises(GeoError):
        cell_to_int("not-a-cell")
    with pytest.raises(GeoError):
        int_to_cell(12345)


def test_latlon_to_cells_and_back():
    cells = latlon_to_cells(np.array([PARIS, LONDON]), 6)
    assert cells.dtype == np.int64
    assert [int_to_cell(c) for c in cells] == [h3.latlng_to_cell(*p, 6) for p in (PARIS, LONDON)]
    centres = cells_to_latlon(cells)
    assert centres.shape == (2, 2)
    # A res-6 centre is within a cell's size (~4 km) of the point.
    assert haversine_km(centres[:, 0], centres[:, 1], *np.array([PARIS, LONDON]).T).max() < 5
    with pytest.raises(GeoError):
        latlon_to_cells([PARIS], 16)


def test_children_of_res3_cell_at_res5():
    parents = latlon_to_cells([PARIS, LONDON], 3)
    parent_index, children = cell_to_children(parents, 5)
    assert len(children) == 2 * 49
    assert children.dtype == np.int64
    for i, child in zip(parent_index, children, strict=True):
        assert h3.cell_to_parent(int_to_cell(child), 3) == int_to_cell(parents[i])
    assert np.bincount(parent_index).tolist() == [49, 49]
    with pytest.raises(GeoError):
        cell_to_children(parents, 2)


def test_centre_child_is_a_child_with_its_parents_centre():
    parents = latlon_to_cells([PARIS, LONDON], 3)
    centre = cell_to_center_child(parents, 5)
    assert centre.dtype == np.int64 and centre.shape == (2,)
    parent_index, children = cell_to_children(parents, 5)
    for i, c in enumerate(centre):
        assert c in children[parent_index == i]
    np.testing.assert_allclose(cells_to_latlon(centre), cells_to_latlon(parents), atol=1e-9)


def test_cell_area():
    cells = latlon_to_cells([PARIS], 3)
    assert cell_area_km2(cells)[0] == pytest.approx(h3.cell_area(int_to_cell(cells[0]), "km^2"))
    assert 10_000 < cell_area_km2(cells)[0] < 15_000  # res 3 hexagons average ~12,400 km²


def test_bbox_plain_and_across_antimeridian():
    europe = BBox.parse("35, -10, 60, 30")
    assert europe.contains(np.array([PARIS, (0.0, 0.0), (40.0, -20.0)])).tolist() == [
        True,
        False,
        False,
    ]
    pacific = BBox(south=-30, west=170, north=0, east=-170)
    pts = np.array([(-17.7, 178.0), (-17.7, -179.0), (-17.7, 180.0), (-17.7, 0.0), (5.0, 175.0)])
    assert pacific.contains(pts).tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d", "10,0,5,1", "0,0,95,1", "0,-200,1,1"])
def test_bbox_parse_errors(text):
    with pytest.raises(GeoError, match=r"south|bbox"):
        BBox.parse(text)


def test_is_land():
    pts = np.array([PARIS, (0.0, -150.0), (30.0, -40.0), (35.68, 139.69), (-80.0, 0.0)])
    assert is_land(pts).tolist() == [True, False, False, True, True]
    assert is_land(np.zeros((0, 2))).shape == (0,)


def test_land_cells_res2():
    cells = land_cells(2)
    everything = all_cells(2)
    assert len(everything) == 5882
    assert cells.dtype == np.int64 and np.all(np.diff(cells) > 0)
    assert 0 < len(cells) < len(everything)
    paris = latlon_to_cells([PARIS], 2)[0]
    pacific = latlon_to_cells([(0.0, -150.0)], 2)[0]
    assert paris in cells
    assert pacific not in cells
    assert pacific in land_cells(2, land_only=False)


def test_land_cells_keep_coastal_cells_with_a_sea_centre():
    dover = cell_to_int("82194ffffffffff")  # Strait of Dover: centre in the sea
    assert not is_land(cells_to_latlon([dover]))[0]
    assert dover in land_cells(2)
    # More generally: some kept cells have sea centres (they touch land by a vertex).
    kept = land_cells(2)
    assert (~is_land(cells_to_latlon(kept))).sum() > 100


def _edges_lon(feature):
    ring = np.array(feature["geometry"]["coordinates"][0])
    assert ring[0].tolist() == ring[-1].tolist()
    return np.abs(np.diff(ring[:, 0]))


def test_geojson_cell_across_antimeridian():
    cell = int_to_cell(latlon_to_cells([(-17.0, 180.0)], 2)[0])
    lngs = [lng for _, lng in h3.cell_to_boundary(cell)]
    assert max(lngs) - min(lngs) > 180  # the raw boundary does jump
    fc = cells_to_geojson([cell], [0.25])
    assert fc["type"] == "FeatureCollection"
    (feature,) = fc["features"]
    assert feature["geometry"]["type"] == "Polygon"
    assert feature["properties"] == {"h3": cell, "value": 0.25}
    assert _edges_lon(feature).max() < 180
    # Shifted, not deformed: same number of vertices, lon within 180 of the centre.
    ring = np.array(feature["geometry"]["coordinates"][0])
    assert len(ring) == len(lngs) + 1
    assert np.all(np.abs(ring[:, 0] - 180.0) < 10)


def test_geojson_polar_cell_spans_the_map():
    cell = int_to_cell(latlon_to_cells([(90.0, 0.0)], 1)[0])
    (feature,) = cells_to_geojson([cell])["features"]
    ring = np.array(feature["geometry"]["coordinates"][0])
    assert ring[:, 0].min() == -180.0 and ring[:, 0].max() == 180.0
    assert ring[:, 1].max() == 90.0
    assert feature["properties"]["value"] is None
