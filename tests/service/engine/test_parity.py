"""Parity with GeoCLIP's own forward/softmax over its 100K gallery, features injected."""

import numpy as np
import pytest
import torch

from encoders.profiles import geoclip_weight_files
from index.gallery import csv_gallery, encode_gallery
from index.geocode import ReverseGeocoder
from index.store import PointTable, load_index, publish_index
from service.engine.locator import Locator
from service.engine.options import LocateOptions

geoclip = pytest.importorskip("geoclip")


class InjectedCLIP(torch.nn.Module):
    """Replaces GeoCLIP's CLIP model: returns the given 768-d features as its image features."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.features = features

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.features


@pytest.fixture(scope="module")
def reference_and_ours(geoclip_heads, tmp_path_factory):
    features = torch.randn(6, 768, generator=torch.Generator().manual_seed(7)) * 0.5
    # GeoCLIP itself: its weights, its gallery, its forward and softmax.
    ref = geoclip.GeoCLIP(from_pretrained=False, clip_pretrained=False)
    ref.image_encoder.CLIP = InjectedCLIP(features)
    ref.weights_folder = str(geoclip_weight_files()["head"].parent)
    ref._load_weights()
    ref.eval()
    with torch.no_grad():
        probs = ref(torch.zeros(6, 3, 224, 224), ref.gps_gallery).softmax(dim=-1)
    top = torch.topk(probs, 5, dim=1)
    ref_gps = ref.gps_gallery[top.indices].numpy()  # (6, 5, 2)
    ref_probs = top.values.numpy()

    root = tmp_path_factory.mktemp("data")
    gallery = csv_gallery(geoclip_weight_files()["gallery"])
    vectors = encode_gallery(gallery, geoclip_heads.embed_gps, 512, progress=False)
    points = PointTable(
        ids=gallery.ids, latlon=gallery.latlon, country=np.full(len(gallery.ids), "", dtype="<U2")
    )
    publish_index(
        root,
        "geoclip-100k",
        vectors,
        points,
        profile="geoclip",
        gallery_kind="csv",
        h3_resolution=None,
    )
    loc = Locator(geoclip_heads, load_index(root, "geoclip-100k"), ReverseGeocoder())
    queries = geoclip_heads.embed_features(features.numpy())
    return loc, queries, ref_gps, ref_probs


def retrieve_only(normalization: str) -> LocateOptions:
    return LocateOptions(
        top_k=5,
        retrieve_k=5,
        refine=False,
        diversify=False,
        verify=False,
        describe=False,
        normalization=normalization,
    )


def test_same_top5_coordinates_in_the_same_order(reference_and_ours):
    loc, queries, ref_gps, _ = reference_and_ours
    for i, res in enumerate(loc.locate_embeddings(queries, retrieve_only("candidates"))):
        ours = np.array([[c.lat, c.lon] for c in res.candidates])
        np.testing.assert_allclose(ours, ref_gps[i], atol=1e-5)


def test_gallery_normalised_probabilities_match(reference_and_ours):
    loc, queries, _, ref_probs = reference_and_ours
    results = loc.locate_embeddings(queries, retrieve_only("gallery"))
    ours = np.array([[c.probability for c in r.candidates] for r in results])
    assert np.abs(ours - ref_probs).max() <= 1e-4
    assert ref_probs.max() > 1e-3  # a peaked distribution, so the comparison means something
