import numpy as np
import pytest

from index.geo import GeoError, cell_area_km2, cell_to_int, int_to_cell, latlon_to_cells
from index.region import country_distribution, uncertainty_region

RES = 3
PARIS = (48.8566, 2.3522)
TOKYO = (35.6762, 139.6503)
SYDNEY = (-33.8688, 151.2093)


def _region(share, probs=(0.2, 0.5, 0.3)):
    return uncertainty_region(
        np.array([PARIS, TOKYO, SYDNEY]), np.array(probs), res=RES, share=share
    )


def _cell(p):
    return int_to_cell(latlon_to_cells([p], RES)[0])


def test_fewest_cells_reaching_the_share():
    reg = _region(0.7)
    assert reg.cells == [_cell(TOKYO), _cell(SYDNEY)]
    assert reg.mass == pytest.approx([0.5, 0.3])
    assert reg.covered == pytest.approx(0.8)
    assert reg.share == 0.7
    expected = cell_area_km2([cell_to_int(c) for c in reg.cells]).sum()
    assert reg.area_km2 == pytest.approx(expected)
    feats = reg.geojson["features"]
    assert [f["properties"]["h3"] for f in feats] == reg.cells
    assert [f["properties"]["value"] for f in feats] == pytest.approx([0.5, 0.3])


def test_share_boundaries():
    assert _region(0.5).cells == [_cell(TOKYO)]
    assert _region(0.8).cells == [_cell(TOKYO), _cell(SYDNEY)]  # exactly reached: no 3rd cell
    assert len(_region(1.0).cells) == 3
    assert _region(1.0).covered == pytest.approx(1.0)


def test_points_in_one_cell_add_up_and_probs_need_not_sum_to_one():
    near_paris = (PARIS[0] + 0.01, PARIS[1] + 0.01)  # same res-3 cell
    pts = np.array([PARIS, near_paris, TOKYO])
    reg = uncertainty_region(pts, np.array([3.0, 3.0, 4.0]), res=RES, share=0.5)
    assert reg.cells == [_cell(PARIS)]
    assert reg.mass == pytest.approx([0.6])


def test_zero_mass_cells_are_never_added():
    reg = _region(1.0, probs=(0.0, 0.6, 0.4))
    assert reg.cells == [_cell(TOKYO), _cell(SYDNEY)]


@pytest.mark.parametrize("share", [0.0, -0.1, 1.01, float("nan")])
def test_share_validation(share):
    with pytest.raises(GeoError, match="share"):
        _region(share)


def test_probability_validation():
    with pytest.raises(GeoError):
        _region(0.5, probs=(0.0, 0.0, 0.0))
    with pytest.raises(GeoError):
        _region(0.5, probs=(0.5, -0.1, 0.6))
    with pytest.raises(GeoError):
        _region(0.5, probs=(0.5, 0.5))


def test_country_distribution():
    codes = np.array(["FR", "JP", "FR", "", "DE"], dtype="<U2")
    dist = country_distribution(codes, np.array([1.0, 3.0, 2.0, 1.5, 0.5]))
    assert [c for c, _ in dist] == ["FR", "JP", "", "DE"]
    assert sum(p for _, p in dist) == pytest.approx(1.0)
    assert dict(dist) == pytest.approx({"FR": 0.375, "JP": 0.375, "": 0.1875, "DE": 0.0625})
    assert all(isinstance(p, float) for _, p in dist)
