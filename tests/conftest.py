"""Shared fixtures: small real models and galleries built in the tests (no CLIP weights)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from encoders.gps import GPSTower
from encoders.image import ImageTower, mlp_head
from encoders.model import GeoModel
from encoders.profiles import geoclip_weight_files


class FeatureBackbone(nn.Module):
    """Stands in for the CLIP visual tower when tests inject 768-d features directly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@functools.cache
def _geoclip_heads() -> GeoModel:
    files = geoclip_weight_files()
    gps = GPSTower()
    gps.load_state_dict(torch.load(files["gps"], weights_only=True))
    tower = ImageTower(FeatureBackbone(), mlp_head((768, 768, 512)))
    tower.head.load_state_dict(torch.load(files["head"], weights_only=True))
    model = GeoModel(tower, gps, preprocess=lambda im: im, profile="geoclip")
    with torch.no_grad():
        model.logit_scale.copy_(torch.load(files["logit_scale"], weights_only=True).reshape(()))
    return model.eval()


@pytest.fixture(scope="session")
def geoclip_heads() -> GeoModel:
    """GeoCLIP's real head, GPS tower and logit scale; no image backbone."""
    return _geoclip_heads()
