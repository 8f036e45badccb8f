"""Training data sources and the `geoloc train` / `geoloc data` domain functions."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from encoders import GeoModel, get_profile, save_checkpoint
from encoders.bluemarble import TileStyle, iter_tiles, sample_centres, write_tileset
from encoders.model import load_state, read_checkpoint
from encoders.train import EpochSource, TrainConfig, TrainReport, train
from index.geo import is_land
from service.engine.images import read_image_file
from service.engine.options import ImageLimits
from service.errors import GeolocError
from service.jobs.datasets import LabelledImage, read_labelled_csv
from service.jobs.features import FeatureCache, cached_source, views_source

#: Tiles for training, drawn afresh: views about 210 to 2,400 km wide (log-uniform), and
#: besides the held-out test's changes, renderings of other sensors and colour balances
#: (hue, grayscale, swapped channels, gamma, false-colour palettes, noise, heavier blur and
#: JPEG), so that the model learns the shape of the land rather than Blue Marble's colours.
TRAIN_STYLE = TileStyle(
    scale=(0.45, 5.0),
    log_scale=True,
    brightness=0.4,
    contrast=0.4,
    saturation=0.5,
    blur=1.5,
    jpeg_quality=(15, 95),
    hue=0.3,
    grayscale=0.15,
    channel_swap=0.15,
    gamma=0.4,
    palette=0.15,
    noise=8.0,
)
#: The held-out test: other centres (another seed), scales, colours, blur and JPEG.
TEST_STYLE = TileStyle(
    scale=(1.0, 2.5), brightness=0.3, contrast=0.3, saturation=0.35, blur=1.2, jpeg_quality=(30, 90)
)
#: Reference tiles (for the image-neighbour index and the pixel baseline): clean views
#: about 240 to 2,100 km wide, so that a neighbour can be found at any zoom. More narrow views
#: than wide ones (density over log-width ∝ width^-0.75): a narrow view covers less ground,
#: so it takes more of them to hold one near any place (bench/tune.py --ref-power chose 0.75
#: on validation draws: 300 km views 68 -> 84 % within 200 km, the other sets level).
REFERENCE_STYLE = TileStyle(scale=(0.5, 4.5), log_scale=True, scale_power=0.75, augment=False)
#: The style of each kind of tile set `geoloc data bluemarble` writes.
TILE_STYLES = {"test": TEST_STYLE, "reference": REFERENCE_STYLE, "train": TRAIN_STYLE}


def bluemarble_source(config: TrainConfig) -> EpochSource:
    """Fresh tiles every epoch, the same ones for the same (seed, epoch)."""
    per_epoch = config.steps_per_epoch * config.batch_size

    def source(epoch: int) -> Iterator[tuple[Image.Image, float, float]]:
        rng = np.random.default_rng([config.seed, epoch])
        centres = sample_centres(per_epoch, rng, is_land)
        for (lat, lon), tile in zip(centres, iter_tiles(centres, rng, TRAIN_STYLE), strict=True):
            yield tile, float(lat), float(lon)

    return source


def read_photos(path: Path) -> list[LabelledImage]:
    """A training CSV's rows, refused whole when a row is bad."""
    rows, problems = read_labelled_csv(path)
    if problems:
        raise GeolocError(
            f"{len(problems)} bad rows in {path}, first: {problems[0]}", type="invalid-dataset"
        )
    if not rows:
        raise GeolocError(f"{path} has no rows", type="invalid-dataset")
    return rows


def csv_source(path: Path, config: TrainConfig, *, limits: ImageLimits) -> EpochSource:
    """A user's geotagged photos from a CSV (image,lat,lon), shuffled per epoch."""
    rows = read_photos(path)

    def source(epoch: int) -> Iterator[tuple[Image.Image, float, float]]:
        order = np.random.default_rng([config.seed, epoch]).permutation(len(rows))
        n = config.steps_per_epoch * config.batch_size
        for i in np.resize(order, n):
            r = rows[int(i)]
            yield read_image_file(r.path, limits), r.lat, r.lon

    return source


def photo_transform(model: GeoModel) -> transforms.Compose:
    """Augmentations that keep geography: crops and colour, never mirror flips."""
    normalize = [t for t in model.preprocess.transforms if isinstance(t, transforms.Normalize)]
    size = model.image_tower.backbone.image_size
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25)),
            transforms.ColorJitter(0.3, 0.3, 0.3, 0.03),
            transforms.ToTensor(),
            *normalize,
        ]
    )


@dataclass(frozen=True)
class TrainJob:
    data: str  # "bluemarble" or a CSV path
    out_dir: Path
    config: TrainConfig


def run_training(
    model: GeoModel,
    job: TrainJob,
    *,
    resume: Path | None,
    progress: bool,
    limits: ImageLimits,
    feature_cache: bool = True,
) -> TrainReport:
    """Train ``model`` on the job's data. Photos with fixed views (``config.views``) and a
    frozen backbone train from cached backbone features unless ``feature_cache`` is False
    (then the same views go through the backbone at every step)."""
    torch.manual_seed(job.config.seed)
    embed = None
    config = job.config
    if job.data == "bluemarble":
        source, transform = bluemarble_source(config), None
    elif config.views:
        rows = read_photos(Path(job.data))
        views = photo_transform(model)
        transform = _as_is
        if feature_cache and config.freeze_backbone:
            if resume is not None:
                # The cache is of the checkpoint's backbone, not of the one built to load it.
                load_state(
                    model, read_checkpoint(resume), source=str(resume), require_backbone=True
                )
            cache = FeatureCache(job.out_dir / "features")
            features = cache.build(
                model, rows, views, views=config.views, seed=config.seed, limits=limits,
                progress=progress,
            )  # fmt: skip
            source = cached_source(features, rows, config)
            embed = model.embed_backbone_features
        else:
            source = views_source(rows, config, views, views=config.views, limits=limits)
    else:
        source = csv_source(Path(job.data), config, limits=limits)
        transform = photo_transform(model)
    return train(
        model,
        source,
        job.config,
        job.out_dir,
        profile_config=get_profile(model.profile).to_dict(),
        transform=transform,
        resume=resume,
        progress=progress,
        embed=embed,
    )


def _as_is(item: torch.Tensor) -> torch.Tensor:
    return item


def export_weights(checkpoint: Path, model: GeoModel, out: Path) -> str:
    """Strip training state from a checkpoint: the file that ships as a profile's weights."""
    blob = read_checkpoint(checkpoint)
    model.load_state_dict(blob["state_dict"], strict=False)
    return save_checkpoint(
        model,
        out,
        config=blob["config"],
        extra={
            "source": checkpoint.name,
            "history": blob["extra"].get("train", {}).get("history", []),
        },
    )


def write_bluemarble_set(
    out_dir: Path,
    count: int,
    *,
    seed: int,
    kind: str,
    progress: bool = True,
    style: TileStyle | None = None,
) -> Path:
    """``count`` tiles of a kind (its style, unless ``style`` is given) and labels.csv."""
    style = style or TILE_STYLES.get(kind)
    if style is None:
        raise GeolocError(f"unknown tile set kind '{kind}'; use test, reference or train")
    from tqdm import tqdm

    with tqdm(total=count, disable=not progress, unit="tile") as bar:
        return write_tileset(
            out_dir, count, seed=seed, style=style, land_fn=is_land, progress=bar.update
        )
