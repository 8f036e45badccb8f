"""A request's nprobe and rerank_k reach the searches of a compressed (IVF) gallery."""

import numpy as np
import pytest

from index.gallery import encode_gallery, h3_gallery
from index.geocode import ReverseGeocoder
from index.store import PointTable, VectorChunk, load_index, publish_index, publish_index_chunked
from service.engine.locator import Locator
from service.engine.options import LocateOptions


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
    # Coarse codes (4 bits for every 32 dimensions) with the exact vectors kept to re-rank.
    publish_index_chunked(
        root,
        "pq",
        lambda: [VectorChunk(vectors, points)],
        count=len(vectors),
        dim=512,
        train_vectors=vectors,
        profile="geoclip",
        gallery_kind="h3",
        h3_resolution=2,
        factory="IVF16,PQ16x4",
        rerank_k=256,
        recall_queries=0,
        device="cpu",
    )
    names = ("exact", "ivf", "pq")
    return {n: Locator(geoclip_heads, load_index(root, n), geocoder) for n in names}


def _cells(locator: Locator, **kw) -> list[list[str]]:
    rng = np.random.default_rng(0)
    q = locator.model.embed_gps(
        np.column_stack([rng.uniform(-50, 60, 40), rng.uniform(-170, 170, 40)])
    )
    base = dict(top_k=10, retrieve_k=64, refine=False, diversify=False, describe=False)
    res = locator.locate_embeddings(q, LocateOptions(**base, **kw))
    return [sorted(c.h3 for c in r.candidates) for r in res]


def test_nprobe_of_a_request_is_used_by_the_gallery_search(locators):
    exact = _cells(locators["exact"])
    # Every list probed: the same answers as exact search; one list: other answers.
    assert _cells(locators["ivf"], nprobe=64) == exact
    assert _cells(locators["ivf"], nprobe=1) != exact


def test_rerank_k_of_a_request_is_used_by_the_gallery_search(locators):
    exact = _cells(locators["exact"])
    n = len(locators["pq"].index)

    def agree(cells: list[list[str]]) -> int:
        return sum(a == b for a, b in zip(cells, exact, strict=True))

    # Every row re-scored: the exact answers; none (the coarse codes alone): other answers;
    # the index's own depth (256) in between.
    assert _cells(locators["pq"], nprobe=16, rerank_k=n) == exact
    codes = _cells(locators["pq"], nprobe=16, rerank_k=0)
    own = _cells(locators["pq"], nprobe=16)
    assert own == _cells(locators["pq"], nprobe=16, rerank_k=256)
    assert agree(codes) < agree(own) < len(exact)
