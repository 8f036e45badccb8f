import open_clip
import pytest
import torch

from encoders import (
    CheckpointError,
    UnknownProfileError,
    WeightsNotFoundError,
    get_profile,
    list_profiles,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from encoders import profiles as profiles_mod
from encoders.image import create_backbone, register_architecture
from encoders.model import load_state

TINY_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
}


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(UnknownProfileError) as err:
        get_profile("nope")
    for name in list_profiles():
        assert name in str(err.value)
    assert isinstance(err.value, ValueError)


def test_profiles_say_what_they_locate():
    assert "satellite" in get_profile("bluemarble").purpose
    assert "not ground photos" in get_profile("bluemarble").purpose
    geoclip = get_profile("geoclip")
    assert (geoclip.architecture, geoclip.pretrained, geoclip.embed_dim) == (
        "ViT-L-14",
        "openai",
        512,
    )


def test_missing_geoclip_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(profiles_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsNotFoundError, match="pip install"):
        profiles_mod.geoclip_weight_files()


def test_missing_bundled_weights_is_an_error_not_random_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(profiles_mod, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(WeightsNotFoundError, match=r"docs/TRAINING\.md"):
        load_model("bluemarble")


def test_local_backbone_checkpoint_loads_through_open_clip(tmp_path):
    register_architecture("tiny-test-vit", TINY_ARCH)
    ref = open_clip.create_model("tiny-test-vit", pretrained=None)
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": ref.state_dict()}, path)
    visual, preprocess, _ = create_backbone("tiny-test-vit", None, checkpoint=path)
    for (k, a), b in zip(
        ref.visual.state_dict().items(), visual.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k
    assert preprocess is not None


def test_missing_backbone_checkpoint_file(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        create_backbone("ViT-L-14", "openai", checkpoint=tmp_path / "absent.pt")


def bluemarble_random():
    return profiles_mod.build_model(get_profile("bluemarble"), random_backbone=True)


def test_checkpoint_round_trip(tmp_path):
    model = bluemarble_random()
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    path = tmp_path / "m.pt"
    save_checkpoint(model, path, config=get_profile("bluemarble").to_dict())
    other = bluemarble_random()
    load_state(other, read_checkpoint(path), source=str(path), require_backbone=True)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_checkpoint_without_backbone_is_refused_when_backbone_has_no_other_source(tmp_path):
    model = bluemarble_random()
    path = tmp_path / "m.pt"
    save_checkpoint(model, path, config={}, include_backbone=False)
    with pytest.raises(CheckpointError, match="missing"):
        load_state(bluemarble_random(), read_checkpoint(path), source="m", require_backbone=True)


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path):
    model = bluemarble_random()
    path = tmp_path / "m.pt"
    save_checkpoint(model, path, config={})
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a geoloc checkpoint"):
        read_checkpoint(tmp_path / "foreign.pt")


def test_checkpoint_of_another_profile_is_refused(tmp_path, geoclip_heads):
    path = tmp_path / "m.pt"
    save_checkpoint(bluemarble_random(), path, config={})
    with pytest.raises(CheckpointError, match="profile 'bluemarble'"):
        load_state(geoclip_heads, read_checkpoint(path), source="m", require_backbone=False)
