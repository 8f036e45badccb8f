"""A model profile with a text tower that builds offline, for the text-query tests: a small
open_clip config (text encoder included) with random weights, registered like the bundled
profiles (``registered``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from encoders.profiles import PROFILES, Profile

TINY_TEXT = Profile(
    name="tiny-text",
    description="test profile: tiny ViT and text encoder, random weights",
    purpose="test pictures",
    architecture="geoloc-tiny-text-vit",
    pretrained=None,
    head_dims=(32, 64, 64),
    gps_hidden=64,
    gps_rff=16,
    weights="tiny-text.pt",
    architecture_config={
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 64,
            "patch_size": 16,
            "head_width": 32,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    },
    has_text=True,
)


@contextmanager
def registered(profile: Profile = TINY_TEXT) -> Iterator[Profile]:
    """``profile`` known to get_profile/load_model while the block runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PROFILES, profile.name, profile)
        yield profile
