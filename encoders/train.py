"""Contrastive image<->GPS alignment (GeoCLIP-style), with checkpoints and resume.

Each step: image embeddings of a batch against GPS embeddings of the batch's own
locations plus a queue of earlier locations (extra negatives), InfoNCE with the
learnable temperature ``logit_scale``; "symmetric" adds the GPS->image direction
over the batch. Deterministic for a seed (single process, seeded data streams).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from encoders.errors import CheckpointError
from encoders.model import GeoModel, load_state, read_checkpoint, save_checkpoint

#: A source of labelled images: given an epoch number, yields (PIL image, lat, lon).
EpochSource = Callable[[int], Iterator[tuple[Image.Image, float, float]]]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    queue_size: int = 1024
    #: Gaussian jitter (km) on queued GPS negatives, as GeoCLIP does, so the queue
    #: teaches fine distinctions near the true location too.
    queue_jitter_km: float = 50.0
    loss: str = "symmetric"  # or "image" (image->GPS only)
    freeze_backbone: bool = False
    #: Fixed augmented views per photo (0: augment afresh at every step). With a frozen
    #: backbone their features can be computed once (service/jobs/features.py).
    views: int = 0
    steps_per_epoch: int = 100
    seed: int = 0
    max_logit_scale: float = math.log(100.0)

    def __post_init__(self) -> None:
        if self.loss not in ("symmetric", "image"):
            raise ValueError("loss must be 'symmetric' or 'image'")
        for name in ("epochs", "batch_size", "steps_per_epoch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.queue_size < 0:
            raise ValueError("queue_size must be >= 0")
        if self.views < 0:
            raise ValueError("views must be >= 0")


@dataclass
class EpochReport:
    epoch: int
    loss: float
    images_per_second: float
    seconds: float
    checkpoint: str


@dataclass
class TrainReport:
    epochs: list[EpochReport] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [e.loss for e in self.epochs]


class GPSQueue:
    """A ring buffer of recent (lat, lon) labels used as extra negatives."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = torch.zeros(size, 2)
        self.filled = 0
        self.ptr = 0

    def push(self, latlon: torch.Tensor) -> None:
        if self.size == 0:
            return
        for row in latlon[-self.size :]:
            self.data[self.ptr] = row
            self.ptr = (self.ptr + 1) % self.size
            self.filled = min(self.filled + 1, self.size)

    def get(self) -> torch.Tensor:
        return self.data[: self.filled]

    def state(self) -> dict[str, Any]:
        return {"data": self.data.clone(), "filled": self.filled, "ptr": self.ptr}

    def load(self, state: dict[str, Any]) -> None:
        self.data = state["data"].clone()
        self.filled, self.ptr = int(state["filled"]), int(state["ptr"])


def jitter_latlon(latlon: torch.Tensor, km: float, gen: torch.Generator) -> torch.Tensor:
    if km <= 0 or not len(latlon):
        return latlon
    dlat = torch.randn(len(latlon), generator=gen) * km / 111.2
    coslat = torch.cos(torch.deg2rad(latlon[:, 0])).clamp(min=0.05)
    dlon = torch.randn(len(latlon), generator=gen) * km / (111.2 * coslat)
    lat = (latlon[:, 0] + dlat).clamp(-90, 90)
    lon = torch.remainder(latlon[:, 1] + dlon + 180, 360) - 180
    return torch.stack([lat, lon], dim=1)


def contrastive_loss(
    model: GeoModel,
    pixels: torch.Tensor,
    latlon: torch.Tensor,
    negatives: torch.Tensor,
    symmetric: bool,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    img = (embed or model.image_embedding)(pixels)
    gps = model.gps_embedding(torch.cat([latlon, negatives]) if len(negatives) else latlon)
    scale = model.logit_scale.exp()
    logits = scale * img @ gps.T  # (B, B + Q)
    target = torch.arange(len(img))
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits[:, : len(img)].T, target))
    return loss


def _batches(
    source: Iterator[tuple[Image.Image, float, float]],
    model: GeoModel,
    transform: Callable[[Image.Image], torch.Tensor],
    size: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    imgs: list[torch.Tensor] = []
    pts: list[tuple[float, float]] = []
    for im, lat, lon in source:
        imgs.append(transform(im))
        pts.append((lat, lon))
        if len(imgs) == size:
            yield torch.stack(imgs).to(model.device), torch.tensor(pts, dtype=torch.float32)
            imgs, pts = [], []


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    model: GeoModel,
    source: EpochSource,
    config: TrainConfig,
    out_dir: Path,
    *,
    profile_config: dict[str, Any],
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    resume: Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TrainReport:
    """Train in place; write ``epoch-NNN.pt`` and ``last.pt`` into out_dir every epoch.

    ``transform`` turns a PIL image into a tensor (default: the model's preprocessing;
    pass a geography-keeping augmentation for photos). ``resume`` continues from a
    checkpoint written by this function, with its optimizer, schedule, queue and RNG.
    ``embed``: the source's items to unit image embeddings (default: the image tower;
    cached backbone features go through the head only).
    """
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    transform = transform or model.prepare
    model.image_tower.set_backbone_trainable(not config.freeze_backbone)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = config.epochs * config.steps_per_epoch
    warmup = max(1, int(config.warmup_fraction * total))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    queue = GPSQueue(config.queue_size)
    gen = torch.Generator().manual_seed(config.seed)
    start_epoch = 0
    report = TrainReport()
    _seed_all(config.seed)
    if resume is not None:
        blob = read_checkpoint(resume)
        state = blob.get("extra", {}).get("train")
        if not state:
            raise CheckpointError(
                f"{resume} has no training state to resume from; "
                "use a checkpoint written by `geoloc train`"
            )
        try:  # options added since take their defaults
            saved = asdict(TrainConfig(**state["config"]))
        except TypeError as exc:
            raise CheckpointError(
                f"{resume} was written by another version of geoloc train ({exc})"
            ) from None
        wanted = asdict(config) | {"epochs": saved["epochs"]}
        differ = {k: saved[k] for k in saved if saved[k] != wanted[k]}
        if differ:
            options = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in differ.items())
            raise CheckpointError(
                f"{resume} was trained with other settings ({options}); resume with the same ones"
            )
        load_state(model, blob, source=str(resume), require_backbone=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        queue.load(state["queue"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = int(state["epoch"]) + 1
        report.epochs = [EpochReport(**e) for e in state.get("history", [])]

    step = start_epoch * config.steps_per_epoch
    for epoch in range(start_epoch, config.epochs):
        model.train()
        t0 = time.perf_counter()
        seen, loss_sum = 0, 0.0
        batches = _batches(source(epoch), model, transform, config.batch_size)
        bar = tqdm(
            total=config.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            unit="step",
        )
        for _ in range(config.steps_per_epoch):
            try:
                pixels, latlon = next(batches)
            except StopIteration:
                break
            negatives = jitter_latlon(queue.get(), config.queue_jitter_km, gen)
            loss = contrastive_loss(
                model, pixels, latlon, negatives, config.loss == "symmetric", embed
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, config.max_logit_scale)
            queue.push(latlon)
            step += 1
            seen += len(pixels)
            loss_sum += float(loss.detach()) * len(pixels)
            rate = seen / (time.perf_counter() - t0)
            bar.set_postfix(
                loss=f"{float(loss.detach()):.3f}",
                img_s=f"{rate:.0f}",
                T=f"{float(model.logit_scale.detach().exp()):.1f}",
            )
            bar.update()
            if on_step is not None:
                on_step(step, float(loss.detach()))
        bar.close()
        seconds = time.perf_counter() - t0
        model.eval()
        ckpt = out_dir / f"epoch-{epoch + 1:03d}.pt"
        entry = EpochReport(
            epoch=epoch,
            loss=loss_sum / max(seen, 1),
            images_per_second=seen / max(seconds, 1e-9),
            seconds=seconds,
            checkpoint=str(ckpt),
        )
        report.epochs.append(entry)
        train_state = {
            "epoch": epoch,
            "config": asdict(config),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "queue": queue.state(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": [asdict(e) for e in report.epochs],
        }
        for path in (ckpt, out_dir / "last.pt"):
            save_checkpoint(model, path, config=profile_config, extra={"train": train_state})
    return report
