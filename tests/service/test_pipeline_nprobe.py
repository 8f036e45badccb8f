"""A request's nprobe reaches the searches of a compressed (IVF) gallery."""

import numpy as np
import pytest

from index.gallery import encode_gallery, h3_gallery
from index.geocode import ReverseGeocoder
from index.store import PointTable, load_index, publish_index
from service.pipeline import LocateOptions, Locator


@pytest.fixture(scope="module")
def locators(geoclip_heads, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    gallery = h3_gallery(2, land_only=True)
    vectors = encode_gallery(gallery, geoclip_heads.embed_gps, 512, progress=False)
    geocoder = ReverseGeocoder()
    points = PointTable(gallery.ids, gallery.latlon, geocoder.country_codes(gallery.latlon))
    for name, factory in (("exact", "Flat"), ("ivf", "IVF64,Flat")):
        publish_index(
            root,
            name,
            vectors,
            points,
            profile="geoclip",
            gallery_kind="h3",
            h3_resolution=2,
            factory=factory,
        )
    return {n: Locator(geoclip_heads, load_index(root, n), geocoder) for n in ("exact", "ivf")}


def test_nprobe_of_a_request_is_used_by_the_gallery_search(locators, geoclip_heads):
    rng = np.random.default_rng(0)
    q = geoclip_heads.embed_gps(
        np.column_stack([rng.uniform(-50, 60, 40), rng.uniform(-170, 170, 40)])
    )
    base = dict(top_k=10, retrieve_k=64, refine=False, diversify=False, describe=False)

    def cells(loc, **kw):
        res = loc.locate_embeddings(q, LocateOptions(**base, **kw))
        return [sorted(c.h3 for c in r.candidates) for r in res]

    exact = cells(locators["exact"])
    # Every list probed: the same answers as exact search; one list: other answers.
    assert cells(locators["ivf"], nprobe=64) == exact
    assert cells(locators["ivf"], nprobe=1) != exact
