import numpy as np
import pytest
import torch

from encoders.gps import GPSTower, equal_earth_projection
from encoders.profiles import geoclip_weight_files


def random_points(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))  # uniform on the sphere
    return np.stack([lat, rng.uniform(-180, 180, n)], axis=1).astype(np.float32)


def test_parity_with_geoclip_location_encoder(geoclip_heads):
    geoclip = pytest.importorskip("geoclip")
    ref = geoclip.LocationEncoder()  # loads the package's weights itself
    pts = torch.from_numpy(random_points(10_000))
    with torch.no_grad():
        expected = ref(pts).numpy()
        ours = geoclip_heads.gps_tower(pts).numpy()
    assert np.abs(ours - expected).max() <= 1e-4


def test_loads_geoclip_state_dict_as_is():
    state = torch.load(geoclip_weight_files()["gps"], weights_only=True)
    tower = GPSTower()
    assert set(tower.state_dict()) == set(state)
    tower.load_state_dict(state, strict=True)


def test_embed_batches_match_forward_and_are_unit_vectors(geoclip_heads):
    pts = random_points(1000, seed=1)
    tower = geoclip_heads.gps_tower
    emb = tower.embed(pts, batch_size=64)
    with torch.no_grad():
        full = torch.nn.functional.normalize(tower(torch.from_numpy(pts)), dim=-1).numpy()
    np.testing.assert_allclose(emb, full, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_equal_earth_is_bounded_and_symmetric():
    pts = torch.tensor([[0.0, 0.0], [90.0, 0.0], [-90.0, 180.0], [45.0, -90.0], [-45.0, 90.0]])
    xy = equal_earth_projection(pts)
    assert torch.allclose(xy[0], torch.zeros(2))
    assert torch.all(xy.abs() <= 1.0)
    assert torch.allclose(xy[3], -xy[4], atol=1e-6)


def test_nearby_points_embed_closer_than_far_points(geoclip_heads):
    emb = geoclip_heads.embed_gps(np.array([[48.85, 2.35], [48.9, 2.4], [-33.9, 151.2]]))
    assert emb[0] @ emb[1] > emb[0] @ emb[2]
