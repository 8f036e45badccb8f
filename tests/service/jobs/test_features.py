"""Fine-tuning from cached frozen-backbone features: computed once, read by every epoch and
by --resume, the same losses as running the same views through the backbone, and made anew
when the backbone or the photos change (or continued when the pass was interrupted)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import get_profile
from encoders.profiles import build_model
from encoders.train import TrainConfig
from service.engine.options import ImageLimits
from service.jobs import features as features_mod
from service.jobs.training import TrainJob, run_training

LIMITS = ImageLimits(10_000_000, 40_000_000, 20.0, 32)
PHOTOS = 40  # more than one caching chunk (features.CHUNK)
CONFIG = TrainConfig(
    epochs=2, batch_size=8, steps_per_epoch=5, lr=1e-3, queue_size=16, seed=7,
    freeze_backbone=True, views=3,
)  # fmt: skip


def photos(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    lines = ["image,lat,lon"]
    for i in range(PHOTOS):
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((48, 40)).save(tmp_path / f"p{i}.png")
        lines.append(f"p{i}.png,{rng.uniform(-60, 60):.3f},{rng.uniform(-180, 180):.3f}")
    csv = tmp_path / "photos.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(get_profile("bluemarble"), random_backbone=True)


class Counter:
    """Counts the images the backbone sees (a forward hook)."""

    def __init__(self, m, fail_after: int | None = None) -> None:
        self.images, self.fail_after = 0, fail_after
        m.image_tower.backbone.register_forward_hook(self)

    def __call__(self, module, args, out) -> None:
        self.images += len(args[0])
        if self.fail_after is not None and self.images > self.fail_after:
            raise KeyboardInterrupt


def train(m, csv: Path, out: Path, *, cache: bool = True, resume: Path | None = None, **kw):
    config = TrainConfig(**{**CONFIG.__dict__, **kw})
    return run_training(
        m, TrainJob(str(csv), out, config), resume=resume, progress=False, limits=LIMITS,
        feature_cache=cache,
    )  # fmt: skip


def test_features_are_computed_once_and_give_the_uncached_losses(tmp_path):
    csv = photos(tmp_path)
    cached_model = model()
    seen = Counter(cached_model)
    cached = train(cached_model, csv, tmp_path / "run")
    assert seen.images == PHOTOS * CONFIG.views  # the caching pass only; epochs read the cache
    manifest = (tmp_path / "run" / "features" / "manifest.json").read_text()
    assert f'"done": {PHOTOS}' in manifest and '"views": 3' in manifest

    plain_model = model()
    plain_seen = Counter(plain_model)
    plain = train(plain_model, csv, tmp_path / "plain", cache=False)
    assert plain_seen.images == CONFIG.epochs * CONFIG.steps_per_epoch * CONFIG.batch_size
    assert cached.losses == pytest.approx(plain.losses, abs=1e-4)
    # Within noise: Adam's steps (about lr each, whatever the gradient's size) amplify float
    # rounding of near-zero gradients, which differs between CPUs' kernels. A few weights may
    # then differ by about a step (1.1e-3 seen on an AVX2 CPU); nearly all are the same.
    diff = torch.cat(
        [(a - b).abs().flatten() for a, b in zip(cached_model.parameters(),
                                                  plain_model.parameters(), strict=True)]
    )  # fmt: skip
    assert diff.max() <= 2 * CONFIG.lr
    assert (diff > 1e-5).float().mean() <= 1e-3

    # --resume reads the cache, though the model it loads into starts with other weights
    # (as `geoloc train --resume` builds it) ...
    sha = json.loads(manifest)["backbone_sha256"]
    again = model(seed=5)
    again_seen = Counter(again)
    train(again, csv, tmp_path / "run", epochs=3, resume=tmp_path / "run" / "last.pt")
    assert again_seen.images == 0
    assert (
        json.loads((tmp_path / "run" / "features" / "manifest.json").read_text())["backbone_sha256"]
        == sha
    )


def test_a_damaged_feature_file_is_computed_again(tmp_path, caplog):
    csv = photos(tmp_path)
    train(model(), csv, tmp_path / "run", epochs=1)
    features = tmp_path / "run" / "features" / "features.f32"
    features.write_bytes(features.read_bytes()[:1000])
    again = model()
    seen = Counter(again)
    with caplog.at_level(logging.WARNING, logger=features_mod.__name__):
        train(again, csv, tmp_path / "run", epochs=1)
    assert "damaged" in caplog.text and seen.images == PHOTOS * CONFIG.views


def test_a_changed_backbone_or_photo_list_makes_a_new_cache(tmp_path, caplog):
    csv = photos(tmp_path)
    train(model(), csv, tmp_path / "run", epochs=1)
    other = model()
    with torch.no_grad():
        next(other.image_tower.backbone.parameters()).add_(0.05)
    seen = Counter(other)
    with caplog.at_level(logging.WARNING, logger=features_mod.__name__):
        train(other, csv, tmp_path / "run", epochs=1)
    assert "another backbone_sha256" in caplog.text and seen.images == PHOTOS * CONFIG.views
    caplog.clear()
    Image.new("RGB", (48, 40), (1, 2, 3)).save(tmp_path / "p3.png")
    seen = Counter(other)
    with caplog.at_level(logging.WARNING, logger=features_mod.__name__):
        train(other, csv, tmp_path / "run", epochs=1)
    assert "another photos_sha256" in caplog.text and seen.images == PHOTOS * CONFIG.views


def test_an_interrupted_caching_pass_continues(tmp_path):
    csv = photos(tmp_path)
    first = model()
    Counter(first, fail_after=features_mod.CHUNK * CONFIG.views)  # dies in the second chunk
    with pytest.raises(KeyboardInterrupt):
        train(first, csv, tmp_path / "run")
    again = model()
    seen = Counter(again)
    train(again, csv, tmp_path / "run")
    assert seen.images == (PHOTOS - features_mod.CHUNK) * CONFIG.views
