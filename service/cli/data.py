"""`geoloc data bluemarble`: labelled image sets (Blue Marble tiles)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from service.cli.common import friendly_errors

app = typer.Typer(help="Make labelled image sets.", no_args_is_help=True)


@app.command("bluemarble")
@friendly_errors
def data_bluemarble(
    out: Annotated[Path, typer.Argument(help="Directory for the tiles and labels.csv.")],
    count: Annotated[int, typer.Option(min=1, help="Number of tiles.")] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed (use one not used for training).")] = 12345,
    kind: Annotated[
        str, typer.Option(help="test (augmented), reference (clean) or train.")
    ] = "test",
) -> None:
    """Write Blue Marble tiles (JPEG) and labels.csv (image,lat,lon)."""
    from service.jobs.training import write_bluemarble_set

    csv = write_bluemarble_set(out, count, seed=seed, kind=kind)
    typer.echo(f"wrote {count} {kind} tiles and {csv}")
