"""The text tower: open_clip's text encoder into the image head, loaded like the image backbone
(a tiny open_clip config with random weights stands in for ViT-L-14, which is not offline)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from encoders import CheckpointError, WeightsNotFoundError, get_profile, load_model
from encoders.image import register_architecture
from encoders.model import read_checkpoint, save_checkpoint
from encoders.profiles import build_model, text_profiles
from tests.text_profile import TINY_TEXT, registered

TEXTS = ["a sandy desert with dunes", "snowy mountains above a glacier"]


@pytest.fixture(scope="module")
def tiny():
    with registered():
        yield build_model(TINY_TEXT)


def test_geoclip_has_the_text_tower_and_bluemarble_has_none():
    assert get_profile("geoclip").has_text and not get_profile("bluemarble").has_text
    assert "geoclip" in text_profiles() and "bluemarble" not in text_profiles()


def test_text_goes_through_clip_text_encoder_then_the_image_head(tiny):
    tokens = open_clip.get_tokenizer(TINY_TEXT.architecture)(TEXTS)
    with torch.no_grad():
        features = tiny.text_tower.clip.encode_text(tokens)  # CLIP's projected text features
        expected = F.normalize(tiny.image_tower.head(features), dim=-1).numpy()
    got = tiny.embed_texts(TEXTS)
    assert got.shape == (2, TINY_TEXT.embed_dim)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(got[0], got[1])


def test_text_tower_is_frozen_holds_no_visual_copy_and_stays_out_of_slim_checkpoints(
    tiny, tmp_path
):
    assert not any(p.requires_grad for p in tiny.text_tower.parameters())
    keys = list(tiny.state_dict())
    assert any(k.startswith("text_tower.") for k in keys)
    assert not any(k.startswith("text_tower.clip.visual.") for k in keys)
    path = tmp_path / "slim.pt"
    save_checkpoint(tiny, path, config={}, include_backbone=False)
    assert not any(k.startswith("text_tower.") for k in read_checkpoint(path)["state_dict"])


def test_text_tower_loads_through_the_profile_checkpoint_path(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny, path, config=TINY_TEXT.to_dict())
    with registered():
        loaded = load_model(TINY_TEXT.name, checkpoint=path)
        fresh = build_model(TINY_TEXT)  # other random weights
    np.testing.assert_allclose(loaded.embed_texts(TEXTS), tiny.embed_texts(TEXTS), atol=1e-6)
    assert not np.allclose(fresh.embed_texts(TEXTS), tiny.embed_texts(TEXTS), atol=1e-3)


def test_missing_text_weights_are_clear_errors_never_random_weights(tiny, tmp_path):
    with registered(), pytest.raises(WeightsNotFoundError, match=r"tiny-text\.pt"):
        load_model(TINY_TEXT.name)
    # A checkpoint without the text tower, for a profile whose weights have no other source.
    path = tmp_path / "no-text.pt"
    blob_model = build_model(replace(TINY_TEXT, has_text=False))
    save_checkpoint(blob_model, path, config={})
    blob = read_checkpoint(path)
    blob["profile"] = TINY_TEXT.name
    torch.save(blob, path)
    with registered(), pytest.raises(CheckpointError, match="text_tower"):
        load_model(TINY_TEXT.name, checkpoint=path)


def test_a_hub_tagged_text_tower_loads_from_a_local_open_clip_checkpoint(tmp_path):
    # As for geoclip (ViT-L-14 / openai): the tag cannot be fetched offline, so the error says
    # how to get the weights; the same weights from a local file load, text tower included.
    hub = replace(TINY_TEXT, name="tiny-text-hub", pretrained="openai", weights="geoclip-package")
    with registered(hub):
        with pytest.raises(WeightsNotFoundError, match="GEOLOC_BACKBONE_CHECKPOINT"):
            build_model(hub)
        register_architecture(hub.architecture, hub.architecture_config)
        reference = open_clip.create_model(hub.architecture, pretrained=None)
        path = tmp_path / "open_clip.pt"
        torch.save({"state_dict": reference.state_dict()}, path)
        model = build_model(hub, backbone_checkpoint=path)
    tokens = open_clip.get_tokenizer(hub.architecture)(TEXTS)
    with torch.no_grad():
        expected = F.normalize(model.image_tower.head(reference.encode_text(tokens)), dim=-1)
    np.testing.assert_allclose(model.embed_texts(TEXTS), expected.numpy(), atol=1e-6)
