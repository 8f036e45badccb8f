"""The `geoloc` command line: build and list indexes, locate images, evaluate."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import typer

from encoders import get_profile, list_profiles
from index.geo import BBox
from index.store import list_indexes
from service.datasets import read_labelled_csv
from service.engine import GallerySpec, build_index, load_geomodel, load_locator
from service.errors import GeolocError
from service.evaluation import errors_km, format_summary, summarize_distances
from service.images import read_image_file
from service.settings import Settings

app = typer.Typer(
    help="geoloc: image geolocation (retrieval over a GPS gallery).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
index_app = typer.Typer(help="Build and list gallery indexes.", no_args_is_help=True)
app.add_typer(index_app, name="index")

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


def _load_images(paths: list[Path], s: Settings) -> tuple[list[Any], list[Path], list[str]]:
    images, ok, problems = [], [], []
    for p in paths:
        try:
            images.append(
                read_image_file(p, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)
            )
            ok.append(p)
        except GeolocError as exc:
            problems.append(f"[{exc.type}] {exc.detail}")
    return images, ok, problems


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
