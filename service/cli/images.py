"""`geoloc images add`: reference images with known GPS (the image-neighbour index)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from service.cli.common import friendly_errors, settings

app = typer.Typer(
    help="Reference images with known GPS (image-neighbour index).", no_args_is_help=True
)


#: Bad rows printed by `images add`; the job's bad_rows.csv lists all of them.
_MAX_LISTED_PROBLEMS = 20


@app.command("add")
@friendly_errors
def images_add(
    data: Annotated[
        Path,
        typer.Argument(
            help="CSV or Parquet table: uri (or image/path), lat, lon, optional integer id; "
            "relative paths are resolved against the table's folder."
        ),
    ],
    name: Annotated[str, typer.Option(help="Reference index name; default refs-<profile>.")] = "",
    profile: Annotated[str, typer.Option(help="Model profile.")] = "",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model batch.")] = 64,
    runner: Annotated[
        str,
        typer.Option(
            help="auto (Ray at GEOLOC_REFS_RAY_MIN_ROWS rows or with --ray-address), "
            "inprocess or ray."
        ),
    ] = "auto",
    ray_address: Annotated[
        str, typer.Option(help="Ray cluster to run on (default GEOLOC_RAY_ADDRESS; local).")
    ] = "",
    shard_rows: Annotated[
        int, typer.Option(min=0, help="Rows per shard; 0: GEOLOC_REFS_SHARD_ROWS.")
    ] = 0,
    actors: Annotated[
        int, typer.Option(min=0, help="Ray encoder actors; 0: GEOLOC_RAY_ACTORS.")
    ] = 0,
    factory: Annotated[
        str,
        typer.Option(help="faiss factory; default Flat, or IVF-PQ above the threshold."),
    ] = "",
    device: Annotated[
        str, typer.Option(help="Encoders' torch device: auto (CUDA if present), cpu, cuda...")
    ] = "auto",
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="The new version holds only this table's images, not the previous version's "
            "(e.g. to rebuild an index after a weights change).",
        ),
    ] = False,
) -> None:
    """Embed reference photos; locate then retrieves their GPS as candidates.

    Resumable: run the same command again after an interruption and the finished shards
    are kept. Bad rows are listed in the job's bad_rows.csv and never stop the job.
    """
    from service.engine.loading import load_geomodel
    from service.jobs.indexes import add_reference_images

    s = settings()
    model = load_geomodel(s, profile or None)
    r = add_reference_images(
        s,
        data,
        model=model,
        name=name,
        batch_size=batch_size,
        runner=runner,
        ray_address=ray_address,
        shard_rows=shard_rows,
        actors=actors,
        factory=factory,
        device=device,
        replace=replace,
    )
    if r.left_out:
        typer.echo(f"note: {r.left_out}")
    for p in r.problems[:_MAX_LISTED_PROBLEMS]:
        typer.echo(f"error: {p}", err=True)
    if len(r.problems) > _MAX_LISTED_PROBLEMS:
        typer.echo(f"error: ... {len(r.problems) - _MAX_LISTED_PROBLEMS} more", err=True)
    m = r.manifest
    if r.already_published:
        typer.echo(f"already added: {data} was published as {m.name}/{m.version}")
    else:
        resumed = f", resumed {r.resumed_shards} finished shards" if r.resumed_shards else ""
        recall = m.extra.get("recall_at_10")
        typer.echo(
            f"published {m.name}/{m.version}: {m.count} reference images, {m.factory}"
            + (
                f" (1-recall@10 {recall} at nprobe {m.extra.get('recall_nprobe')}"
                + (
                    f", exact re-ranking of {m.extra['rerank_k']}"
                    if m.extra.get("rerank_k")
                    else ""
                )
                + ")"
                if recall
                else ""
            )
            + f"; {m.extra.get('added')} added, {len(r.problems)} bad rows ({r.runner}{resumed})"
        )
    typer.echo(f"report: {r.report}")
    if r.problems:
        raise typer.Exit(1)
