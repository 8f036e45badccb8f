"""The `geoloc` command line: build and list indexes, locate images, evaluate."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import typer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from encoders import get_profile, list_profiles
from index.geo import BBox
from index.store import list_indexes
from service.datasets import read_labelled_csv
from service.db import (
    SchemaNotAtHeadError,
    activate_index,
    check_at_head,
    create_api_key,
    current_revision,
    display_url,
    downgrade,
    head_revision,
    list_api_keys,
    make_engine,
    make_sessionmaker,
    revoke_api_key,
    sync_index_versions,
    upgrade,
)
from service.engine import GallerySpec, build_index, load_geomodel, load_locator
from service.errors import GeolocError
from service.evaluation import errors_km, format_summary, summarize_distances
from service.images import read_image_files
from service.settings import Settings

app = typer.Typer(
    help="geoloc: image geolocation (retrieval over a GPS gallery).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
index_app = typer.Typer(help="Build and list gallery indexes.", no_args_is_help=True)
app.add_typer(index_app, name="index")
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")
apikey_app = typer.Typer(help="API keys for the HTTP API.", no_args_is_help=True)
app.add_typer(apikey_app, name="apikey")

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def friendly_errors(fn: F) -> F:
    """Every expected failure becomes one 'error: ...' line and exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except GeolocError as exc:
            fail(f"[{exc.type}] {exc.detail}")
        except (ValueError, FileNotFoundError, PermissionError, KeyError) as exc:
            fail(str(exc) if not isinstance(exc, KeyError) else str(exc.args[0]))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


def settings() -> Settings:
    return Settings()


def _db_error_line(exc: SQLAlchemyError) -> str:
    # The driver's own message, first line: SQLAlchemy appends the SQL and a help link.
    orig = getattr(exc, "orig", None)
    return (str(orig or exc).strip().splitlines() or [type(exc).__name__])[0]


def db_errors(fn: F) -> F:
    """Database failures (unreachable server, bad credentials...) become one error line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SQLAlchemyError as exc:
            fail(f"[database-error] {_db_error_line(exc)}")

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def db_session(s: Settings) -> Iterator[Session]:
    """A session on a database whose schema is at head (else SchemaNotAtHeadError)."""
    engine = make_engine(s.db_url)
    try:
        check_at_head(engine)
        with make_sessionmaker(engine)() as session:
            yield session
    finally:
        engine.dispose()


def _record_index_version(s: Settings) -> None:
    """Register published versions in the database; the build succeeds whatever happens here."""
    try:
        with db_session(s) as session:
            sync_index_versions(session, s.index_dir)
    except SchemaNotAtHeadError:
        typer.echo("note: the database schema is not at head: run `geoloc db upgrade` to record it")
    except (SQLAlchemyError, ValueError) as exc:
        line = _db_error_line(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
        typer.echo(f"note: not recorded in the database ({line}); `geoloc index activate` will")


@app.command("profiles")
@friendly_errors
def profiles_cmd() -> None:
    """List the model profiles and what each one locates."""
    for name in list_profiles():
        p = get_profile(name)
        typer.echo(f"{name:12s} {p.description}\n{'':12s} locates: {p.purpose}")


@index_app.command("build")
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
    model = load_geomodel(s, profile or None, random_backbone=random_backbone)
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


@index_app.command("list")
@friendly_errors
def index_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List published index versions."""
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


@index_app.command("activate")
@friendly_errors
@db_errors
def index_activate(
    name: Annotated[str, typer.Argument(help="Index name.")],
    version: Annotated[str, typer.Argument(help="Version to serve (geoloc index list).")],
) -> None:
    """Make NAME/VERSION the served version of NAME (replicas pick it up)."""
    s = settings()
    with db_session(s) as session:
        sync_index_versions(session, s.index_dir)  # versions built before the database existed
        row = activate_index(session, name, version)
        typer.echo(
            f"active: {row.name}/{row.version} ({row.profile}, {row.gallery_kind}, "
            f"{row.count} points)"
        )


def _load_images(paths: list[Path], s: Settings) -> tuple[list[Any], list[Path], list[str]]:
    images, ok, problems = read_image_files(
        paths, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels
    )
    return images, [paths[i] for i in ok], problems


@app.command("locate")
@friendly_errors
def locate_cmd(
    images: Annotated[list[Path], typer.Argument(help="Image files (JPEG, PNG, WebP).")],
    top_k: Annotated[int | None, typer.Option(help="Candidates per image.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    profile: Annotated[str, typer.Option(help="Model profile.")] = "",
    index: Annotated[str, typer.Option(help="Index name[/version].")] = "",
    refine: Annotated[bool, typer.Option(help="H3 refinement stage.")] = True,
    diversify: Annotated[bool, typer.Option(help="Spatial NMS stage.")] = True,
    verify: Annotated[bool, typer.Option(help="Verification stage.")] = True,
    bbox: Annotated[str, typer.Option(help="Search only in south,west,north,east.")] = "",
    country: Annotated[
        list[str] | None, typer.Option(help="Search only in these ISO codes.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model batch.")] = 16,
    neighbours: Annotated[int | None, typer.Option(help="Reference images to retrieve.")] = None,
) -> None:
    """Locate images; several are encoded as one batch."""
    s = settings()
    if profile:
        s = s.model_copy(update={"profile": profile})
    name, _, version = index.partition("/")
    opts = s.locate_options(
        top_k=top_k,
        refine=refine,
        diversify=diversify,
        verify=verify,
        bbox=BBox.parse(bbox) if bbox else None,
        countries=tuple(country or ()),
    )
    pil, ok, problems = _load_images(images, s)
    for p in problems:
        typer.echo(f"error: {p}", err=True)
    if not pil:
        raise typer.Exit(2)
    loc = load_locator(s, index_name=name or None, index_version=version or None)
    results = []
    for start in range(0, len(pil), batch_size):
        results += loc.locate(pil[start : start + batch_size], opts)
    if as_json:
        out = [{"image": str(p), **r.to_dict()} for p, r in zip(ok, results, strict=True)]
        typer.echo(json.dumps(out if len(out) > 1 else out[0], indent=2))
    else:
        for p, r in zip(ok, results, strict=True):
            typer.echo(f"{p}  ({r.profile}, index {r.index})")
            for i, c in enumerate(r.candidates, 1):
                place = ", ".join(x for x in (c.city, c.admin1, c.country) if x) or "at sea"
                typer.echo(
                    f"  {i}. {c.lat:9.4f} {c.lon:10.4f}  p={c.probability:.3f}  {c.h3}  {place}"
                )
            if r.region:
                typer.echo(
                    f"  region: {len(r.region['cells'])} cells, "
                    f"{r.region['area_km2']:.0f} km² hold {r.region['covered']:.0%}"
                )
    if problems:
        raise typer.Exit(1)


@app.command("eval")
@friendly_errors
def eval_cmd(
    data: Annotated[Path, typer.Argument(help="CSV with image,lat,lon (paths relative to it).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    skip_bad: Annotated[
        bool, typer.Option(help="Evaluate the good rows despite bad ones.")
    ] = False,
    limit: Annotated[int, typer.Option(min=0, help="Evaluate at most N rows (0: all).")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model batch.")] = 32,
    refine: Annotated[bool, typer.Option(help="H3 refinement stage.")] = True,
    diversify: Annotated[bool, typer.Option(help="Spatial NMS stage.")] = True,
    index: Annotated[str, typer.Option(help="Index name[/version].")] = "",
) -> None:
    """Share of top-1 predictions within 1/25/200/750/2500 km, median km, GeoScore."""
    s = settings()
    rows, problems = read_labelled_csv(data)
    for p in problems:
        typer.echo(f"error: {p}", err=True)
    if problems and not skip_bad:
        fail(f"{len(problems)} bad rows in {data}; fix them or pass --skip-bad")
    if limit:
        rows = rows[:limit]
    if not rows:
        fail(f"no usable rows in {data}")
    name, _, version = index.partition("/")
    loc = load_locator(s, index_name=name or None, index_version=version or None)
    opts = s.locate_options(top_k=1, refine=refine, diversify=diversify, describe=False)
    preds, truths, bad = [], [], 0
    with typer.progressbar(
        range(0, len(rows), batch_size), label="locating", file=sys.stderr
    ) as bar:
        for start in bar:
            chunk = rows[start : start + batch_size]
            pil, ok_paths, img_problems = _load_images([r.path for r in chunk], s)
            for p in img_problems:
                typer.echo(f"error: {p}", err=True)
            bad += len(img_problems)
            good = [r for r in chunk if r.path in set(ok_paths)]
            for r, res in zip(good, loc.locate(pil, opts) if pil else [], strict=True):
                c = res.candidates[0]
                preds.append((c.lat, c.lon))
                truths.append((r.lat, r.lon))
    summary = summarize_distances(errors_km(np.array(preds), np.array(truths)))
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "data": str(data),
                    "index": loc.index_label,
                    "profile": loc.model.profile,
                    **summary.to_dict(),
                },
                indent=2,
            )
        )
    else:
        typer.echo(
            format_summary(summary, label=f"{data} ({loc.model.profile}, {loc.index_label}): ")
        )
    if bad and not skip_bad:
        raise typer.Exit(1)


data_app = typer.Typer(help="Make labelled image sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("bluemarble")
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
    from service.training import write_bluemarble_set

    csv = write_bluemarble_set(out, count, seed=seed, kind=kind)
    typer.echo(f"wrote {count} {kind} tiles and {csv}")


@app.command("train")
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
    seed: Annotated[int, typer.Option()] = 0,
    resume: Annotated[Path | None, typer.Option(help="Checkpoint to continue from.")] = None,
    export: Annotated[Path | None, typer.Option(help="Also write final weights here.")] = None,
) -> None:
    """Contrastive image<->GPS alignment; a checkpoint every epoch."""
    from encoders.profiles import build_model, get_profile
    from encoders.train import TrainConfig
    from service.training import TrainJob, export_weights, run_training

    s = settings()
    name = profile or s.profile
    if init == "random" or resume is not None:
        model = build_model(get_profile(name), random_backbone=True)
    elif init == "profile":
        model = load_geomodel(s, name)
    else:
        model = load_geomodel(s.model_copy(update={"checkpoint": Path(init)}), name)
    config = TrainConfig(
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        lr=lr,
        queue_size=queue_size,
        queue_jitter_km=queue_jitter_km,
        loss=loss,
        freeze_backbone=freeze_backbone,
        seed=seed,
    )
    report = run_training(
        model,
        TrainJob(data, out, config),
        resume=resume,
        progress=True,
        max_bytes=s.max_image_bytes,
        max_pixels=s.max_image_pixels,
    )
    for e in report.epochs:
        typer.echo(
            f"epoch {e.epoch + 1}: loss {e.loss:.4f}, {e.images_per_second:.0f} img/s, "
            f"{e.seconds:.0f} s -> {e.checkpoint}"
        )
    if export is not None and report.epochs:
        digest = export_weights(Path(report.epochs[-1].checkpoint), model, export)
        typer.echo(f"exported {export} (sha256 {digest[:16]}...)")


images_app = typer.Typer(
    help="Reference images with known GPS (image-neighbour index).", no_args_is_help=True
)
app.add_typer(images_app, name="images")


@images_app.command("add")
@friendly_errors
def images_add(
    data: Annotated[Path, typer.Argument(help="CSV of image,lat,lon (paths relative to it).")],
    name: Annotated[str, typer.Option(help="Reference index name; default refs-<profile>.")] = "",
    profile: Annotated[str, typer.Option(help="Model profile.")] = "",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model batch.")] = 64,
) -> None:
    """Embed reference photos; locate then retrieves their GPS as candidates."""
    from service.engine import add_reference_images

    s = settings()
    model = load_geomodel(s, profile or None)
    m, problems = add_reference_images(s, data, model=model, name=name, batch_size=batch_size)
    for p in problems:
        typer.echo(f"error: {p}", err=True)
    typer.echo(
        f"published {m.name}/{m.version}: {m.count} reference images "
        f"({m.extra.get('added')} added, {len(problems)} skipped)"
    )
    if problems:
        raise typer.Exit(1)


@db_app.command("upgrade")
@friendly_errors
@db_errors
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Create or migrate the database schema (safe to run again)."""
    url = settings().db_url
    engine = make_engine(url)
    try:
        before = current_revision(engine)
    finally:
        engine.dispose()
    after = upgrade(url, revision)
    if before == after:
        typer.echo(f"{display_url(url)}: already at {after}")
    else:
        typer.echo(f"{display_url(url)}: upgraded {before or 'empty'} -> {after}")


@db_app.command("downgrade")
@friendly_errors
@db_errors
def db_downgrade(
    revision: Annotated[
        str, typer.Argument(help="Target revision: '-1' for one step, 'base' drops all tables.")
    ],
) -> None:
    """Migrate the database schema down (loses the data of what is removed)."""
    url = settings().db_url
    after = downgrade(url, revision)
    typer.echo(f"{display_url(url)}: now at {after or 'base (no tables)'}")


@db_app.command("current")
@friendly_errors
@db_errors
def db_current(
    check: Annotated[bool, typer.Option(help="Exit 1 unless the schema is at head.")] = False,
) -> None:
    """Show the database's schema revision and the one this geoloc needs."""
    url = settings().db_url
    engine = make_engine(url)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    state = "at head" if current == head else "not at head: run `geoloc db upgrade`"
    typer.echo(f"{display_url(url)}: {current or 'empty'} (head {head}, {state})")
    if check and current != head:
        raise typer.Exit(1)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value is not None else "-"


@apikey_app.command("create")
@friendly_errors
@db_errors
def apikey_create(
    name: Annotated[str, typer.Argument(help="Who or what uses the key.")],
    scope: Annotated[
        list[str] | None, typer.Option(help="locate and/or admin (repeat); default locate.")
    ] = None,
) -> None:
    """Create an API key and print it: it is shown only this once."""
    with db_session(settings()) as session:
        key, row = create_api_key(session, name, scope or ["locate"])
    typer.echo(key)
    typer.echo(
        f"created key {row.id} {row.name!r} (prefix {row.prefix}, scopes {row.scopes}); "
        "store it now: it cannot be shown again",
        err=True,
    )


@apikey_app.command("list")
@friendly_errors
@db_errors
def apikey_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List API keys (prefixes only: the keys themselves are not stored)."""
    with db_session(settings()) as session:
        rows = list_api_keys(session)
    if as_json:
        out = [
            {
                "id": r.id,
                "name": r.name,
                "prefix": r.prefix,
                "scopes": sorted(r.scope_set),
                "created_at": r.created_at.isoformat(),
                "last_used_at": r.last_used_at.isoformat() if r.last_used_at else None,
                "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
            }
            for r in rows
        ]
        typer.echo(json.dumps(out, indent=2))
        return
    if not rows:
        typer.echo("no API keys yet: geoloc apikey create NAME")
    for r in rows:
        status = f"revoked {_when(r.revoked_at)}" if r.revoked_at else "active"
        typer.echo(
            f"{r.id:>4}  {r.prefix}  {r.name:20s} {r.scopes:14s} created {_when(r.created_at)}  "
            f"last used {_when(r.last_used_at)}  {status}"
        )


@apikey_app.command("revoke")
@friendly_errors
@db_errors
def apikey_revoke(
    key: Annotated[str, typer.Argument(help="Key id or prefix, as `geoloc apikey list` shows.")],
) -> None:
    """Revoke an API key: requests using it are refused from now on."""
    with db_session(settings()) as session:
        row = revoke_api_key(session, key)
    typer.echo(
        f"revoked key {row.id} {row.name!r} (prefix {row.prefix}) at {_when(row.revoked_at)}"
    )


@app.command("serve")
@friendly_errors
def serve_cmd(
    host: Annotated[str | None, typer.Option(help="Listen address; default GEOLOC_HOST.")] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port; default GEOLOC_PORT.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Worker processes; default GEOLOC_WORKERS.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the HTTP API (uvicorn; each worker loads the model and index once)."""
    import uvicorn

    s = settings()
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=host or s.host,
        port=s.port if port is None else port,
        workers=workers or s.workers,
        log_level=log_level,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
