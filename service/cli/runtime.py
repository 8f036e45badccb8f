"""`geoloc runtime export|show`: the image tower exported for another runtime."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from service.cli.common import fail, friendly_errors, settings

app = typer.Typer(
    help="Export the image tower for ONNX Runtime (fp32, int8, int8-residual or int8-fp32) "
    "and show what is exported.",
    no_args_is_help=True,
)


@app.command("export")
@friendly_errors
def runtime_export(
    runtime: Annotated[str, typer.Option(help="onnx; default GEOLOC_IMAGE_RUNTIME.")] = "",
    precision: Annotated[
        str,
        typer.Option(
            help="fp32, int8, int8-residual or int8-fp32; default GEOLOC_IMAGE_PRECISION."
        ),
    ] = "",
    profile: Annotated[str, typer.Option(help="Model profile; default GEOLOC_PROFILE.")] = "",
) -> None:
    """Export the loaded weights' image tower (again), then compare it with torch's on
    generated pictures: the largest difference of the unit embeddings, and the cosine."""
    s = settings()
    runtime = runtime or s.image_runtime
    precision = precision or s.image_precision
    if runtime == "torch":
        fail("the torch runtime runs the loaded tower: nothing to export (--runtime onnx)")
    import numpy as np

    from encoders.runtime import (
        artifact_dir,
        check_choice,
        export_image_runtime,
        load_image_runtime,
        parity_pictures,
    )
    from service.engine.loading import load_geomodel

    check_choice(runtime, precision)
    model = load_geomodel(s, profile or None, image_runtime=False)
    directory = artifact_dir(s.runtimes_dir, model.profile, runtime, precision)
    export_image_runtime(model, directory, runtime, precision, portable=s.image_int8_portable)
    pictures = parity_pictures(24)
    reference = model.embed_images(pictures)
    load_image_runtime(
        model, s.runtimes_dir, runtime, precision, export=False, portable=s.image_int8_portable
    )
    exported = model.embed_images(pictures)
    cosine = np.sum(reference * exported, axis=1)
    typer.echo(
        json.dumps(
            {
                "path": str(directory),
                "profile": model.profile,
                "weights": model.weights_id,
                "runtime": runtime,
                "precision": precision,
                "max_abs_difference": float(np.abs(reference - exported).max()),
                "min_cosine": float(cosine.min()),
            },
            indent=2,
        )
    )


@app.command("show")
@friendly_errors
def runtime_show(
    profile: Annotated[str, typer.Option(help="Model profile; default GEOLOC_PROFILE.")] = "",
) -> None:
    """The exported image towers of a profile and their manifests (JSON)."""
    from encoders.runtime import PRECISIONS, artifact_info

    s = settings()
    found = [
        artifact_info(s.runtimes_dir, profile or s.profile, "onnx", precision)
        for precision in PRECISIONS
    ]
    typer.echo(json.dumps(found, indent=2))
