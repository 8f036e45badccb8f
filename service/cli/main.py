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
from service.config import Settings
from service.db import (
    SchemaNotAtHeadError,
    activate_index,
    check_at_head,
    create_api_key,
    current_revision,
    display_url,
    downgrade,
    error_line,
    head_revision,
    list_api_keys,
    make_engine,
    make_sessionmaker,
    revoke_api_key,
    sync_index_versions,
    upgrade,
    wait_for_database,
)
from service.engine.images import read_image_files
from service.engine.loading import (
    GallerySpec,
    build_index,
    load_geomodel,
    load_locator,
    verify_published,
)
from service.engine.locator import text_query
from service.errors import GeolocError
from service.jobs.datasets import read_labelled_csv

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


def db_errors(fn: F) -> F:
    """Database failures (unreachable server, bad credentials...) become one error line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SQLAlchemyError as exc:
            fail(f"[database-error] {error_line(exc)}")

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def db_session(s: Settings) -> Iterator[Session]:
    """A session on a database whose schema is at head (else SchemaNotAtHeadError)."""
    engine = make_engine(s.db_url, s.database_wait_s)
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
        line = error_line(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
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
    verify_published(s, name, version)
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
    images: Annotated[
        list[Path] | None, typer.Argument(help="Image files (JPEG, PNG, WebP).")
    ] = None,
    text: Annotated[
        str,
        typer.Option(
            "--text",
            help="Locate this description of a place instead of images (profiles with a "
            "text tower, e.g. geoclip).",
        ),
    ] = "",
    top_k: Annotated[int | None, typer.Option(help="Candidates per image.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    profile: Annotated[str, typer.Option(help="Model profile.")] = "",
    index: Annotated[str, typer.Option(help="Index NAME or NAME/VERSION.")] = "",
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
    """Locate images (several are encoded as one batch), or a description with --text."""
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
    if bool(text) == bool(images):
        fail('give image files, or --text "a description of a place", not both')
    problems: list[str] = []
    if text:
        query = text_query(text, s.max_text_chars)
        loc = load_locator(s, index_name=name or None, index_version=version or None)
        results = loc.locate_texts([query], opts)
        labels = [("text", query)]
    else:
        pil, ok, problems = _load_images(images or [], s)
        for p in problems:
            typer.echo(f"error: {p}", err=True)
        if not pil:
            raise typer.Exit(2)
        loc = load_locator(s, index_name=name or None, index_version=version or None)
        results = []
        for start in range(0, len(pil), batch_size):
            results += loc.locate(pil[start : start + batch_size], opts)
        labels = [("image", str(p)) for p in ok]
    if as_json:
        out = [{key: label, **r.to_dict()} for (key, label), r in zip(labels, results, strict=True)]
        typer.echo(json.dumps(out if len(out) > 1 else out[0], indent=2))
    else:
        for (_, label), r in zip(labels, results, strict=True):
            typer.echo(f"{label}  ({r.profile}, index {r.index})")
            verdict = r.localizability
            if verdict is not None and verdict["verdict"] != "located":
                typer.echo(f"  {verdict_line(verdict)}")
            for i, c in enumerate(r.candidates, 1):
                place = ", ".join(x for x in (c.city, c.admin1, c.country) if x) or "at sea"
                typer.echo(
                    f"  {i}. {c.lat:9.4f} {c.lon:10.4f}  p={c.probability:.3f}  {c.h3}  {place}"
                    + ("" if c.reliable else "  (unreliable)")
                )
            if r.region:
                typer.echo(
                    f"  region: {len(r.region['cells'])} cells, "
                    f"{r.region['area_km2']:.0f} km² hold {r.region['covered']:.0%}"
                )
    if problems:
        raise typer.Exit(1)


def verdict_line(verdict: dict[str, Any]) -> str:
    """'not_locatable (0.03): unlike the satellite views ...' for a localizability verdict."""
    line = f"{verdict['verdict']} ({verdict['score']:.2f}): {verdict['reason']}"
    return line + ("; abstained" if verdict["abstained"] else "")


def _read_eval_rows(data: Path, skip_bad: bool, limit: int) -> list[Any]:
    rows, problems = read_labelled_csv(data)
    for p in problems:
        typer.echo(f"error: {p}", err=True)
    if problems and not skip_bad:
        fail(f"{len(problems)} bad rows in {data}; fix them or pass --skip-bad")
    rows = rows[:limit] if limit else rows
    if not rows:
        fail(f"no usable rows in {data}")
    return rows


def _embed_rows(
    loc: Any, rows: list[Any], s: Settings, batch_size: int, image_stats: bool = False
) -> Any:
    from service.jobs.evaluate import embed_rows

    with typer.progressbar(length=len(rows), label="encoding", file=sys.stderr) as bar:
        emb = embed_rows(
            loc,
            rows,
            max_bytes=s.max_image_bytes,
            max_pixels=s.max_image_pixels,
            batch_size=batch_size,
            progress=bar.update,
            image_stats=image_stats,
        )
    for p in emb.problems:
        typer.echo(f"error: {p}", err=True)
    return emb


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
    index: Annotated[str, typer.Option(help="Index NAME or NAME/VERSION.")] = "",
    within_km: Annotated[
        float | None,
        typer.Option(help="ECE event: top-1 within this many km; default GEOLOC_CALIBRATION_KM."),
    ] = None,
    bins: Annotated[int, typer.Option(min=1, max=100, help="Reliability bins.")] = 10,
    region_res: Annotated[
        int | None,
        typer.Option(help="H3 resolution of the ranked region (Recall-vs-Area)."),
    ] = None,
    calibrated: Annotated[
        bool,
        typer.Option(
            "--calibrated/--uncalibrated",
            help="Use the served calibration (GEOLOC_CALIBRATION: its temperature and "
            "localizability verdict) or neither (temperature 1, no verdicts).",
        ),
    ] = True,
    temperature: Annotated[
        float | None, typer.Option(help="Softmax temperature to evaluate (overrides both).")
    ] = None,
    plots: Annotated[Path | None, typer.Option(help="Write PNG figures into this folder.")] = None,
    compare: Annotated[
        Path | None, typer.Option(help="Another run's --json output, drawn on the same figures.")
    ] = None,
    label: Annotated[str, typer.Option(help="This run's name in figures.")] = "",
    groups: Annotated[
        int, typer.Option(min=0, help="Countries and continents shown on the terminal.")
    ] = 15,
) -> None:
    """Top-1 distance table (1/25/200/750/2500 km, median, GeoScore) overall, by continent
    and by country; Recall-vs-Area of the ranked region; calibration (ECE) of the top-1
    probability; optional PNG figures."""
    from service.jobs.evaluate import eval_options, format_report, measure

    s = settings()
    other = _read_report(compare) if compare is not None else None
    rows = _read_eval_rows(data, skip_bad, limit)
    name, _, version = index.partition("/")
    if not calibrated:
        s = s.model_copy(update={"calibration": "off"})
    loc = load_locator(s, index_name=name or None, index_version=version or None)
    opts = eval_options(
        s.locate_options(refine=refine, diversify=diversify, temperature=temperature),
        **({} if region_res is None else {"region_res": region_res}),
    )
    opts.validate(max_top_k=s.max_top_k, max_retrieve_k=s.max_retrieve_k)
    emb = _embed_rows(loc, rows, s, batch_size, image_stats=loc.judge is not None)
    results = []
    with typer.progressbar(length=len(emb.rows), label="locating", file=sys.stderr) as bar:
        for start in range(0, len(emb.rows), batch_size):
            part = slice(start, start + batch_size)
            results += loc.locate_embeddings(emb.vectors[part], opts, **emb.part(part))
            bar.update(batch_size)
    truths = np.array([(r.lat, r.lon) for r in emb.rows]).reshape(-1, 2)
    within = s.calibration_km if within_km is None else within_km
    rep = measure(
        truths,
        results,
        within_km=within,
        bins=bins,
        truth_countries=loc.geocoder.country_codes(truths) if len(truths) else None,
    )
    t = loc.temperature(opts)
    cal = loc.calibration
    rep = {
        "label": label or f"{data.parent.name}/{data.name}, temperature {t:.3g}",
        "data": str(data),
        "index": loc.index_label,
        "profile": loc.model.profile,
        "temperature": t,
        "calibration_version": cal.version if cal is not None and temperature is None else None,
        "localizability_version": cal.version if loc.judge is not None and cal else None,
        "abstain_below": loc.abstain_threshold,
        "region_res": opts.region_res,
        "images_unreadable": len(emb.problems),
        **rep,
    }
    if plots is not None:
        from service.jobs.plots import write_plots

        runs = [(rep["label"], rep)] + ([(other["label"], other)] if other else [])
        for path in write_plots(runs, plots):
            typer.echo(f"wrote {path}", err=True)
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
    else:
        head = f"{data} ({loc.model.profile}, {loc.index_label}, temperature {t:.3g}): "
        typer.echo(format_report(rep, label=head, groups=groups))
    if emb.problems and not skip_bad:
        raise typer.Exit(1)


def _read_report(path: Path) -> dict[str, Any]:
    """Another run's `geoloc eval --json` output, checked enough to draw it."""
    try:
        rep = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        fail(f"--compare {path}: cannot read it as JSON: {exc}")
    need = ("label", "recall_vs_area", "calibration", "error_cdf_km", "median_km")
    if not isinstance(rep, dict) or any(k not in rep for k in need):
        fail(f"--compare {path}: not the output of `geoloc eval --json`")
    return rep


@app.command("calibrate")
@friendly_errors
def calibrate_cmd(
    data: Annotated[Path, typer.Argument(help="Held-out CSV of image,lat,lon.")],
    skip_bad: Annotated[bool, typer.Option(help="Fit on the good rows despite bad ones.")] = False,
    limit: Annotated[int, typer.Option(min=0, help="Use at most N rows (0: all).")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model batch.")] = 32,
    index: Annotated[str, typer.Option(help="Index NAME or NAME/VERSION to calibrate.")] = "",
    within_km: Annotated[
        float | None,
        typer.Option(help="Event the probability states; default GEOLOC_CALIBRATION_KM."),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Fit and print; store nothing.")] = False,
    localizability: Annotated[
        bool,
        typer.Option(
            "--localizability/--no-localizability",
            help="Also fit the localizability verdict (these images against generated negatives).",
        ),
    ] = True,
    negatives_per_kind: Annotated[
        int | None,
        typer.Option(
            min=10,
            help="Generated negatives of each kind for the verdict; default "
            "GEOLOC_CALIBRATION_NEGATIVES.",
        ),
    ] = None,
) -> None:
    """Fit the softmax temperature and the localizability verdict on held-out images and
    store them, versioned, beside the index version; the service and `geoloc eval` use the
    newest one."""
    from encoders import get_profile
    from service.engine.negatives import kinds_for
    from service.jobs.evaluate import fit_calibration

    s = settings().model_copy(update={"calibration": "off"})
    rows = _read_eval_rows(data, skip_bad, limit)
    name, _, version = index.partition("/")
    loc = load_locator(s, index_name=name or None, index_version=version or None)
    per_kind = s.calibration_negatives if negatives_per_kind is None else negatives_per_kind
    kinds = kinds_for(get_profile(loc.model.profile).domain) if localizability else ()
    total = len(rows) + per_kind * len(kinds)
    with typer.progressbar(length=total, label="encoding", file=sys.stderr) as bar:
        r = fit_calibration(
            s,
            loc,
            rows,
            data=data,
            within_km=within_km,
            batch_size=batch_size,
            store=not dry_run,
            progress=bar.update,
            localizability=localizability,
            negatives_per_kind=per_kind,
            negatives_progress=bar.update,
        )
    for p in r.problems:
        typer.echo(f"error: {p}", err=True)
    cal, fit = r.calibration, r.calibration.fit
    b, a = fit["before"], fit["after"]
    typer.echo(
        f"{loc.index_label}: temperature {cal.temperature:.4g} on {fit['images']} images "
        f"(top-1 within {cal.within_km:g} km: {a['accuracy']:.1%})\n"
        f"  before: ECE {b['ece']:.4f}, log loss {b['log_loss']:.4f}, "
        f"mean probability {b['mean_confidence']:.3f}\n"
        f"  after:  ECE {a['ece']:.4f}, log loss {a['log_loss']:.4f}, "
        f"mean probability {a['mean_confidence']:.3f}"
    )
    if cal.localizability is not None:
        from service.engine.localizability import fit_lines

        for line in fit_lines(cal.localizability):
            typer.echo(f"  {line}")
    if r.path is not None:
        typer.echo(f"stored {r.path} (GEOLOC_CALIBRATION=latest serves it)")
    if r.problems and not skip_bad:
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
    from service.jobs.training import write_bluemarble_set

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
    from service.engine.loading import set_torch_threads
    from service.jobs.training import TrainJob, export_weights, run_training

    s = settings()
    set_torch_threads(s)
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
    from service.engine.loading import add_reference_images

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


#: Bad rows printed by `images add`; the job's bad_rows.csv lists all of them.
_MAX_LISTED_PROBLEMS = 20


@db_app.command("upgrade")
@friendly_errors
@db_errors
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="First wait for the database (GEOLOC_DATABASE_START_TIMEOUT_S)."
        ),
    ] = False,
) -> None:
    """Create or migrate the database schema (safe to run again, and from several replicas at
    once: they take a lock and migrate one after the other)."""
    s = settings()
    url = s.db_url
    if wait:
        wait_for_database(url, s.database_start_timeout_s, s.database_connect_timeout_s)
    engine = make_engine(url)
    try:
        before = current_revision(engine)
    finally:
        engine.dispose()
    after = upgrade(url, revision, wait_s=s.database_start_timeout_s)
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


@app.command("setup")
@friendly_errors
@db_errors
def setup_cmd() -> None:
    """Build what the default service runs with, once: migrate the database, build the
    default gallery (GEOLOC_DEFAULT_RES), the reference-image index refs-<profile> and the
    calibration (bluemarble renders its own tiles for both). Each step is skipped when its
    result exists and was made with the model's weights (else a new version is built beside
    it); an interrupted run resumes."""
    from service.jobs.setup import run_setup

    run_setup(settings(), echo=typer.echo)


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
    migrate: Annotated[
        bool | None,
        typer.Option(
            "--migrate/--no-migrate",
            help="Wait for the database and migrate it first; default GEOLOC_MIGRATE_ON_START.",
        ),
    ] = None,
) -> None:
    """Serve the HTTP API (uvicorn; each worker loads the model and index once).

    On SIGTERM: /readyz turns 503, in-flight requests finish (GEOLOC_SHUTDOWN_GRACE_S), exit.
    """
    from service.api.server import prepare_database, serve

    s = settings()
    if s.migrate_on_start if migrate is None else migrate:
        typer.echo(db_errors(prepare_database)(s))
    serve(
        s,
        host=host or s.host,
        port=s.port if port is None else port,
        workers=workers or s.workers,
        log_level=log_level,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
