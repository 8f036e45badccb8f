"""Fine-tuning with a frozen backbone: epochs from cached features against the same views
through the backbone at every step.

A synthetic photo set (--photos pictures of structured noise, 256 px, seeded, labelled with
seeded places) and the `geoclip` architecture: ViT-L/14 with seeded random backbone weights
(the same compute as the real ones) and GeoCLIP's own head and GPS tower. Both runs train the
same config (`--freeze-backbone --views K`, batch 32, one pass over the photos per epoch):

- cached: the caching pass (each photo's K views through the backbone once), then epochs that
  read the memory-mapped features;
- uncached: the same views, in the same order, through the backbone at every step.

It prints the caching pass, every epoch's seconds and loss for both runs, the speed-up of
epochs 2+ over epoch 1 (with the caching pass), and the largest loss difference.

    OMP_NUM_THREADS=2 .venv/bin/python bench/finetune.py [--photos 200] [--views 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders import load_model
from encoders.train import TrainConfig
from service.config import Settings
from service.jobs.training import TrainJob, run_training


def write_photos(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(11)
    lines = ["image,lat,lon"]
    for i in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize((256, 256), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 10, (256, 256, 3))
        Image.fromarray(np.clip(np.asarray(im) + noise, 0, 255).astype(np.uint8)).save(
            folder / f"p{i}.jpg", quality=90
        )
        lines.append(f"p{i}.jpg,{rng.uniform(-60, 70):.4f},{rng.uniform(-180, 180):.4f}")
    csv = folder / "photos.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    print(f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        steps_per_epoch=math.ceil(args.photos / args.batch_size),
        lr=1e-4,
        freeze_backbone=True,
        views=args.views,
        seed=0,
    )
    limits = Settings().image_limits()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        csv = write_photos(root, args.photos)
        for name, cache in (("cached", True), ("uncached", False)):
            torch.manual_seed(0)
            model = load_model("geoclip", random_backbone=True)
            started = time.perf_counter()
            report = run_training(
                model, TrainJob(str(csv), root / name, config), resume=None, progress=False,
                limits=limits, feature_cache=cache,
            )  # fmt: skip
            total = time.perf_counter() - started
            epochs = [e.seconds for e in report.epochs]
            # Epoch 1 as the user waits for it: with the caching pass (and model set-up).
            first = total - sum(epochs[1:])
            runs[name] = (first, epochs, report.losses)
            print(
                f"{name}: epoch 1{' (with caching)' if cache else ''} {first:.1f} s; epochs "
                + ", ".join(f"{s:.2f} s" for s in epochs)
                + "; losses "
                + ", ".join(f"{x:.4f}" for x in report.losses)
            )
    first, epochs, losses = runs["cached"]
    later = float(np.mean(epochs[1:]))
    speed = first / later
    print(f"\ncached: epoch 1 {first:.1f} s, later epochs {later:.3f} s: {speed:.0f}x faster")
    u_first, u_epochs, u_losses = runs["uncached"]
    print(f"uncached: epoch 1 {u_first:.1f} s, later epochs {np.mean(u_epochs[1:]):.1f} s")
    print(
        "largest loss difference, cached vs uncached: "
        f"{max(abs(a - b) for a, b in zip(losses, u_losses, strict=True)):.2e}"
    )


if __name__ == "__main__":
    main()
