"""Training on real Blue Marble tiles: loss goes down, checkpoints load, resume is exact."""

import numpy as np
import pytest
import torch

from encoders import CheckpointError, get_profile, load_model
from encoders.bluemarble import iter_tiles, sample_centres
from encoders.profiles import build_model
from encoders.train import TrainConfig, contrastive_loss, train
from index.geo import is_land
from service.jobs.training import TEST_STYLE, bluemarble_source, export_weights

CONFIG = TrainConfig(epochs=1, batch_size=32, steps_per_epoch=10, lr=2e-3, queue_size=64, seed=3)
PROFILE = get_profile("bluemarble").to_dict()


def fresh_model():
    torch.manual_seed(0)
    return build_model(get_profile("bluemarble"), random_backbone=True)


def eval_loss(model, batch):
    model.eval()
    with torch.no_grad():
        return float(contrastive_loss(model, *batch, torch.zeros(0, 2), symmetric=False))


def few_hundred_tiles(n=256):
    """A fixed set of tiles, cycled: one epoch sees each about twice."""
    rng = np.random.default_rng(5)
    centres = sample_centres(n, rng, is_land)
    tiles = list(iter_tiles(centres, rng, TEST_STYLE))

    def source(epoch):
        for i in range(40 * CONFIG.batch_size):
            yield tiles[i % n], float(centres[i % n, 0]), float(centres[i % n, 1])

    return source, tiles, centres


def test_one_epoch_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path):
    model = fresh_model()
    source, tiles, centres = few_hundred_tiles()
    batch = (
        torch.stack([model.preprocess(t) for t in tiles[:64]]),
        torch.tensor(centres[:64], dtype=torch.float32),
    )
    before = eval_loss(model, batch)
    cfg = TrainConfig(**{**CONFIG.__dict__, "steps_per_epoch": 40, "lr": 1e-3})
    report = train(model, source, cfg, tmp_path, profile_config=PROFILE, progress=False)
    after = eval_loss(model, batch)
    assert after < before - 0.5, (before, after)
    assert (tmp_path / "epoch-001.pt").is_file() and (tmp_path / "last.pt").is_file()
    assert report.epochs[0].images_per_second > 0
    loaded = load_model("bluemarble", checkpoint=tmp_path / "last.pt")
    assert eval_loss(loaded, batch) == pytest.approx(after, abs=1e-5)
    # The exported weights (no optimizer state) load as the profile's weights too.
    export_weights(tmp_path / "last.pt", fresh_model(), tmp_path / "w.pt")
    assert eval_loss(
        load_model("bluemarble", checkpoint=tmp_path / "w.pt"), batch
    ) == pytest.approx(after, abs=1e-5)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    two = TrainConfig(**{**CONFIG.__dict__, "epochs": 2, "steps_per_epoch": 3})
    straight = fresh_model()
    train(
        straight,
        bluemarble_source(two),
        two,
        tmp_path / "a",
        profile_config=PROFILE,
        progress=False,
    )

    def crash(step, loss):
        if step == 4:  # first step of the second epoch: epoch-001.pt is on disk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            fresh_model(),
            bluemarble_source(two),
            two,
            tmp_path / "b",
            profile_config=PROFILE,
            progress=False,
            on_step=crash,
        )
    resumed = fresh_model()
    report = train(
        resumed,
        bluemarble_source(two),
        two,
        tmp_path / "b",
        profile_config=PROFILE,
        resume=tmp_path / "b" / "epoch-001.pt",
        progress=False,
    )
    assert [e.epoch for e in report.epochs] == [0, 1]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), (k, a, b)


def test_resume_with_other_settings_or_a_plain_checkpoint_is_refused(tmp_path):
    model = fresh_model()
    small = TrainConfig(**{**CONFIG.__dict__, "steps_per_epoch": 1})
    train(model, bluemarble_source(small), small, tmp_path, profile_config=PROFILE, progress=False)
    other = TrainConfig(**{**small.__dict__, "lr": 0.5})
    with pytest.raises(CheckpointError, match="other settings"):
        train(
            fresh_model(),
            bluemarble_source(other),
            other,
            tmp_path / "x",
            profile_config=PROFILE,
            resume=tmp_path / "last.pt",
            progress=False,
        )
    export_weights(tmp_path / "last.pt", fresh_model(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="no training state"):
        train(
            fresh_model(),
            bluemarble_source(small),
            small,
            tmp_path / "y",
            profile_config=PROFILE,
            resume=tmp_path / "plain.pt",
            progress=False,
        )
