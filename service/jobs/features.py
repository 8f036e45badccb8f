"""Frozen-backbone features for fine-tuning, computed once.

With `geoloc train --freeze-backbone` on a user's photos, the backbone's output for a photo
never changes: only the head and the GPS tower learn. Each photo is augmented into ``views``
fixed views (crops and colour jitter drawn once from a seed), their backbone features are
computed in one pass and kept in a memory-mapped file under the run folder, and every epoch
(and ``--resume``) reads them. The manifest beside it names the backbone (sha256 of its
tensors), the photos (their paths, labels, sizes and modification times), the views, the
seed and the input size: a change to any of them makes a new cache, and the log says which.

``view_pixels`` is also what an uncached run with the same views uses, so that the two can
be compared (`--no-feature-cache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from encoders import GeoModel
from encoders.model import state_digest
from encoders.train import EpochSource, TrainConfig
from index.files import atomic_write
from service.engine.images import read_image_file
from service.engine.options import ImageLimits
from service.jobs.datasets import LabelledImage

CACHE_FORMAT = "geoloc.feature-cache"
CACHE_VERSION = 1
FEATURES_FILE = "features.f32"
MANIFEST_FILE = "manifest.json"
#: Photos per backbone batch of the caching pass (and per manifest update: the unit of
#: resuming an interrupted pass).
CHUNK = 32

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheIdentity:
    backbone_sha256: str
    photos_sha256: str
    photos: int
    views: int
    seed: int
    input_size: list[int]
    dim: int
    transform: str


def photos_digest(rows: list[LabelledImage]) -> str:
    """The photo list as trained on: paths, labels, and each file's size and mtime."""
    h = hashlib.sha256()
    for r in rows:
        st = Path(r.path).stat()
        h.update(
            f"{Path(r.path).resolve()}|{r.lat!r}|{r.lon!r}|{st.st_size}|{st.st_mtime_ns}\n".encode()
        )
    return h.hexdigest()


def view_pixels(
    image: Image.Image, transform: Callable[[Image.Image], torch.Tensor], seed: int, photo: int,
    view: int,
) -> torch.Tensor:  # fmt: skip
    """View ``view`` of photo ``photo``: the transform with its randomness fixed by (seed,
    photo, view), the same in every epoch and every run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.SeedSequence([seed, photo, view]).generate_state(1)[0]))
        return transform(image)


def epoch_picks(
    config: TrainConfig, photos: int, views: int, epoch: int
) -> Iterator[tuple[int, int]]:
    """(photo, view) of every sample of an epoch: a seeded shuffle of the photos, each with a
    seeded choice of one of its views (the same for a cached and an uncached run)."""
    rng = np.random.default_rng([config.seed, epoch])
    n = config.steps_per_epoch * config.batch_size
    order = np.resize(rng.permutation(photos), n)
    chosen = rng.integers(0, views, size=n)
    return zip(order.tolist(), chosen.tolist(), strict=True)


class FeatureCache:
    """``<run>/features``: the (photos, views, dim) float32 features and their manifest."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def _manifest(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.dir / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            return None
        ok = data.get("format") == CACHE_FORMAT and data.get("version") == CACHE_VERSION
        return data if ok else None

    def _write_manifest(self, identity: CacheIdentity, done: int) -> None:
        body = {"format": CACHE_FORMAT, "version": CACHE_VERSION, **asdict(identity), "done": done}
        atomic_write(self.dir / MANIFEST_FILE, (json.dumps(body, indent=2) + "\n").encode())

    def build(
        self,
        model: GeoModel,
        rows: list[LabelledImage],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        views: int,
        seed: int,
        limits: ImageLimits,
        progress: bool = True,
    ) -> np.ndarray:
        """The features, computed where missing: reused when the manifest matches, continued
        when an earlier pass was interrupted, made anew (saying why) when anything changed."""
        from tqdm import tqdm

        backbone = model.image_tower.backbone
        size = list(view_pixels(read_image_file(rows[0].path, limits), transform, seed, 0, 0).shape)
        dim = int(model.image_tower.head[0].in_features)
        identity = CacheIdentity(
            backbone_sha256=state_digest(backbone),
            photos_sha256=photos_digest(rows),
            photos=len(rows),
            views=views,
            seed=seed,
            input_size=size,
            dim=dim,
            transform=repr(transform),
        )
        shape = (len(rows), views, dim)
        old = self._manifest()
        done = 0
        if old is not None:
            changed = [k for k, v in asdict(identity).items() if old.get(k) != v]
            if changed:
                log.warning(
                    "feature cache %s was made for another %s: computing it again",
                    self.dir,
                    ", ".join(changed),
                )
            else:
                done = int(old.get("done", 0))
        path = self.dir / FEATURES_FILE
        expected = int(np.prod(shape)) * 4
        if done and (not path.is_file() or path.stat().st_size != expected):
            log.warning(
                "feature cache %s is damaged (its file is not %d bytes): computing it again",
                self.dir,
                expected,
            )
            done = 0
        self.dir.mkdir(parents=True, exist_ok=True)
        if done == 0:
            (self.dir / MANIFEST_FILE).unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        mode = "r+" if done else "w+"
        features = np.memmap(path, dtype=np.float32, mode=mode, shape=shape)
        if done < len(rows):
            desc = "caching backbone features" + (" (continued)" if done else "")
            with (
                tqdm(
                    total=len(rows), initial=done, disable=not progress, unit="photo", desc=desc
                ) as bar,
                torch.inference_mode(),
            ):
                for start in range(done, len(rows), CHUNK):
                    part = range(start, min(start + CHUNK, len(rows)))
                    pixels = []
                    for i in part:
                        image = read_image_file(rows[i].path, limits)
                        pixels += [view_pixels(image, transform, seed, i, v) for v in range(views)]
                    out = backbone(torch.stack(pixels).to(model.device)).float().cpu().numpy()
                    features[start : part.stop] = out.reshape(len(part), views, dim)
                    features.flush()
                    self._write_manifest(identity, part.stop)
                    bar.update(len(part))
        return np.memmap(path, dtype=np.float32, mode="r", shape=shape)


def cached_source(
    features: np.ndarray, rows: list[LabelledImage], config: TrainConfig
) -> EpochSource:
    """Epochs of (backbone features, lat, lon) read from the cache."""

    def source(epoch: int) -> Iterator[tuple[torch.Tensor, float, float]]:
        for i, v in epoch_picks(config, len(rows), features.shape[1], epoch):
            yield torch.from_numpy(np.array(features[i, v])), rows[i].lat, rows[i].lon

    return source  # type: ignore[return-value]


def views_source(
    rows: list[LabelledImage],
    config: TrainConfig,
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    views: int,
    limits: ImageLimits,
) -> EpochSource:
    """The same epochs as ``cached_source``, with the views made from the photos every time
    (pixels: the backbone runs at every step)."""

    def source(epoch: int) -> Iterator[tuple[torch.Tensor, float, float]]:
        for i, v in epoch_picks(config, len(rows), views, epoch):
            image = read_image_file(rows[i].path, limits)
            yield view_pixels(image, transform, config.seed, i, v), rows[i].lat, rows[i].lon

    return source  # type: ignore[return-value]
