"""`geoloc index build|list|activate`: gallery indexes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from service.cli.common import db_errors, db_session, fail, friendly_errors, settings

if TYPE_CHECKING:
    from service.config import Settings

app = typer.Typer(help="Build and list gallery indexes.", no_args_is_help=True)


def _record_index_version(s: Settings) -> None:
    """Register published versions in the database; the build succeeds whatever happens here."""
    from sqlalchemy.exc import SQLAlchemyError

    from service.db import SchemaNotAtHeadError, error_line, sync_index_versions

    try:
        with db_session(s) as session:
            sync_index_versions(session, s.index_dir)
    except SchemaNotAtHeadError:
        typer.echo("note: the database schema is not at head: run `geoloc db upgrade` to record it")
    except (SQLAlchemyError, ValueError) as exc:
        line = error_line(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
        typer.echo(f"note: not recorded in the database ({line}); `geoloc index activate` will")


@app.command("build")
@friendly_errors
def index_build(
    name: Annotated[str, typer.Argument(help="Index name (lowercase, digits, . _ -).")] = "",
    profile: Annotated[str, typer.Option(help="Model profile.")] = "",
    gallery: Annotated[
        str, typer.Option(help="'h3' (cell centres) or 'csv' (lat/lon file).")
    ] = "h3",
    res: Annotated[int, typer.Option(help="H3 resolution of an h3 gallery (0-7).")] = 4,
    all_cells: Annotated[bool, typer.Option("--all-cells", help="Keep sea cells too.")] = False,
    csv: Annotated[Path | None, typer.Option(help="CSV of points for a csv gallery.")] = None,
    factory: Annotated[str, typer.Option(help="faiss index_factory string.")] = "Flat",
    batch_size: Annotated[int, typer.Option(min=1, help="GPS points per batch.")] = 4096,
    random_backbone: Annotated[bool, typer.Option(hidden=True)] = False,
) -> None:
    """Encode a gallery with the GPS tower and publish a new index version."""
    s = settings()
    if not 0 <= res <= 7:
        fail("--res must be between 0 and 7")
    from service.engine.loading import load_geomodel
    from service.jobs.indexes import GallerySpec, build_index

    model = load_geomodel(s, profile or None, random_backbone=random_backbone, image_runtime=False)
    spec = GallerySpec(kind=gallery, res=res, land_only=not all_cells, csv=csv)
    m = build_index(
        s,
        name or f"default-{model.profile}",
        spec,
        model=model,
        factory=factory,
        batch_size=batch_size,
    )
    typer.echo(
        f"published {m.name}/{m.version}: {m.count} points, profile {m.profile}, "
        f"{m.factory}, {m.extra.get('points_per_second')} points/s"
    )
    _record_index_version(s)


@app.command("list")
@friendly_errors
def index_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List published index versions."""
    from index.manifest import list_indexes

    manifests = list_indexes(settings().index_dir)
    if as_json:
        typer.echo(json.dumps([json.loads(m.to_json()) for m in manifests], indent=2))
        return
    if not manifests:
        typer.echo("no indexes yet: geoloc index build")
    for m in manifests:
        res = f"res {m.h3_resolution}" if m.h3_resolution is not None else ""
        typer.echo(
            f"{m.name}/{m.version}  {m.profile}  {m.gallery_kind} {res}  "
            f"{m.count} points  {m.factory}"
        )


@app.command("activate")
@friendly_errors
@db_errors
def index_activate(
    name: Annotated[str, typer.Argument(help="Index name.")],
    version: Annotated[str, typer.Argument(help="Version to serve (geoloc index list).")],
) -> None:
    """Make NAME/VERSION the served version of NAME (replicas pick it up)."""
    from service.db import activate_index, sync_index_versions
    from service.engine.loading import verify_published

    s = settings()
    verify_published(s, name, version)
    with db_session(s) as session:
        sync_index_versions(session, s.index_dir)  # versions built before the database existed
        row = activate_index(session, name, version)
        typer.echo(
            f"active: {row.name}/{row.version} ({row.profile}, {row.gallery_kind}, "
            f"{row.count} points)"
        )
