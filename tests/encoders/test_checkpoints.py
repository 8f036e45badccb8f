import dataclasses

import numpy as np
import open_clip
import pytest
from PIL import Image

from encoders import CheckpointError, get_profile, read_checkpoint, save_checkpoint
from encoders.checkpoints import checkpoint_profile, load_checkpoint_model, same_as_registered
from encoders.profiles import build_model

#: Another (older, say) architecture of the bluemarble profile than the registered one.
OTHER_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
}


def other_profile():
    return dataclasses.replace(
        get_profile("bluemarble"), head_dims=(32, 48, 40), architecture_config=OTHER_ARCH
    )


def test_a_checkpoint_of_another_architecture_is_built_as_it_was_written(tmp_path):
    profile = other_profile()
    model = build_model(profile)
    path = tmp_path / "old.pt"
    save_checkpoint(model, path, config=profile.to_dict())
    registered = get_profile("bluemarble")
    before = dict(open_clip.factory._MODEL_CONFIGS.get(registered.architecture, {}))

    loaded = load_checkpoint_model(path)

    assert loaded.profile == "bluemarble" and loaded.embed_dim == 40
    tile = [Image.fromarray(np.full((64, 64, 3), 90, np.uint8))]
    np.testing.assert_allclose(loaded.embed_images(tile), model.embed_images(tile), atol=1e-6)
    latlon = np.array([[48.8, 2.3], [-33.9, 151.2]])
    np.testing.assert_allclose(loaded.embed_gps(latlon), model.embed_gps(latlon), atol=1e-6)
    # The registered architecture is left as it was: the old one got a name of its own.
    assert dict(open_clip.factory._MODEL_CONFIGS.get(registered.architecture, {})) == before
    stored = checkpoint_profile(read_checkpoint(path))
    assert stored.architecture.startswith(registered.architecture + "-")
    assert not same_as_registered(stored)


def test_a_checkpoint_of_the_registered_config_keeps_its_architecture_name(tmp_path):
    profile = get_profile("bluemarble")
    path = tmp_path / "same.pt"
    save_checkpoint(build_model(profile), path, config=profile.to_dict())
    stored = checkpoint_profile(read_checkpoint(path))
    assert stored.architecture == profile.architecture
    assert same_as_registered(stored)


def test_a_checkpoint_without_its_config_is_refused(tmp_path):
    path = tmp_path / "bare.pt"
    save_checkpoint(build_model(other_profile()), path, config={})
    with pytest.raises(CheckpointError, match="profile config"):
        load_checkpoint_model(path)
