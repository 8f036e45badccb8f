"""The bundled `bluemarble` model locates satellite views of distinctive places."""

import numpy as np
import pytest

from encoders import load_model
from encoders.bluemarble import render_tile
from index.geo import haversine_km
from index.geocode import ReverseGeocoder
from index.store import load_index
from service.engine import GallerySpec, build_index
from service.pipeline import LocateOptions, Locator
from service.settings import Settings

PLACES = {
    "Sahara": (23.0, 12.0),
    "Himalaya": (29.5, 84.0),
    "Amazon basin": (-4.0, -63.0),
    "Greenland ice": (72.0, -40.0),
    "Nile delta": (30.8, 31.0),
    "Australian outback": (-25.0, 133.0),
}


@pytest.fixture(scope="module")
def locator(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"))
    model = load_model("bluemarble")
    build_index(settings, "bm", GallerySpec(kind="h3", res=3), model=model, progress=False)
    return Locator(model, load_index(settings.data_dir, "bm"), ReverseGeocoder())


@pytest.mark.parametrize("place", PLACES)
def test_distinctive_tiles_are_placed_within_750_km(locator, place):
    lat, lon = PLACES[place]
    tile = render_tile(lat, lon, scale=1.8, size=64)
    top = locator.locate([tile], LocateOptions())[0].candidates[0]
    d = float(haversine_km(lat, lon, top.lat, top.lon))
    assert d < 750, f"{place}: predicted ({top.lat:.1f}, {top.lon:.1f}), {d:.0f} km off"


def test_probabilities_are_a_distribution_and_the_region_holds_the_truth_often(locator):
    tiles = [render_tile(lat, lon, 1.8, 64) for lat, lon in PLACES.values()]
    results = locator.locate(tiles, LocateOptions(top_k=5, region_share=0.9))
    for r in results:
        p = np.array([c.probability for c in r.candidates])
        assert np.all(p >= 0) and p.sum() <= 1 + 1e-6 and np.all(np.diff(p) <= 1e-9)
        assert r.profile == "bluemarble"
