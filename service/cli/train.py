"""`geoloc train`: contrastive training or fine-tuning of a model profile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from service.cli.common import friendly_errors, settings


@friendly_errors
def train_cmd(
    data: Annotated[str, typer.Argument(help="'bluemarble' or a CSV of image,lat,lon.")],
    out: Annotated[Path, typer.Option(help="Directory for epoch checkpoints.")] = Path(
        "runs/train"
    ),
    profile: Annotated[str, typer.Option(help="Model profile to train or fine-tune.")] = "",
    init: Annotated[
        str, typer.Option(help="'profile' (its weights), 'random' or a .pt.")
    ] = "profile",
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    steps_per_epoch: Annotated[int, typer.Option(min=1)] = 100,
    batch_size: Annotated[int, typer.Option(min=2)] = 128,
    lr: Annotated[float, typer.Option(min=0)] = 1e-3,
    queue_size: Annotated[int, typer.Option(min=0)] = 1024,
    queue_jitter_km: Annotated[float, typer.Option(min=0, help="Jitter of queued GPS.")] = 50.0,
    loss: Annotated[str, typer.Option(help="symmetric or image")] = "symmetric",
    freeze_backbone: Annotated[bool, typer.Option(help="Train only head and GPS tower.")] = False,
    views: Annotated[
        int,
        typer.Option(
            min=0,
            help="With --freeze-backbone on photos: fixed augmented views per photo, drawn "
            "once from --seed, whose backbone features are computed once into OUT/features "
            "(0: fresh augmentation every step, no cache).",
        ),
    ] = 4,
    feature_cache: Annotated[
        bool,
        typer.Option(help="With --freeze-backbone and --views: train from cached features."),
    ] = True,
    seed: Annotated[int, typer.Option()] = 0,
    resume: Annotated[Path | None, typer.Option(help="Checkpoint to continue from.")] = None,
    export: Annotated[Path | None, typer.Option(help="Also write final weights here.")] = None,
) -> None:
    """Contrastive image<->GPS alignment; a checkpoint every epoch."""
    from encoders.profiles import build_model, get_profile
    from encoders.train import TrainConfig
    from service.engine.loading import load_geomodel, set_torch_threads
    from service.jobs.training import TrainJob, export_weights, run_training

    s = settings()
    set_torch_threads(s)
    name = profile or s.profile
    if init == "random" or resume is not None:
        model = build_model(get_profile(name), random_backbone=True)
    elif init == "profile":
        model = load_geomodel(s, name, image_runtime=False)
    else:
        model = load_geomodel(
            s.model_copy(update={"checkpoint": Path(init)}), name, image_runtime=False
        )
    config = TrainConfig(
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        lr=lr,
        queue_size=queue_size,
        queue_jitter_km=queue_jitter_km,
        loss=loss,
        freeze_backbone=freeze_backbone,
        # Fixed views pay off only with a frozen backbone; Blue Marble tiles are new each epoch.
        views=views if freeze_backbone and data != "bluemarble" else 0,
        seed=seed,
    )
    report = run_training(
        model,
        TrainJob(data, out, config),
        resume=resume,
        progress=True,
        limits=s.image_limits(),
        feature_cache=feature_cache,
    )
    for e in report.epochs:
        typer.echo(
            f"epoch {e.epoch + 1}: loss {e.loss:.4f}, {e.images_per_second:.0f} img/s, "
            f"{e.seconds:.0f} s -> {e.checkpoint}"
        )
    if export is not None and report.epochs:
        digest = export_weights(Path(report.epochs[-1].checkpoint), model, export)
        typer.echo(f"exported {export} (sha256 {digest[:16]}...)")
