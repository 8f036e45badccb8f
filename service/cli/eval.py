"""`geoloc eval` and `geoloc calibrate`: accuracy and calibration on labelled images."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from service.cli.common import fail, friendly_errors, settings

if TYPE_CHECKING:
    from service.config import Settings


def _read_eval_rows(data: Path, skip_bad: bool, limit: int) -> list[Any]:
    from service.jobs.datasets import read_labelled_csv

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
    loc: Any,
    rows: list[Any],
    s: Settings,
    batch_size: int,
    image_stats: bool = False,
    grey_views: bool = False,
) -> Any:
    from service.jobs.evaluate import embed_rows

    with typer.progressbar(length=len(rows), label="encoding", file=sys.stderr) as bar:
        emb = embed_rows(
            loc,
            rows,
            limits=s.image_limits(),
            batch_size=batch_size,
            progress=bar.update,
            image_stats=image_stats,
            grey_views=grey_views,
        )
    for p in emb.problems:
        typer.echo(f"error: {p}", err=True)
    return emb


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
    s = settings()
    other = _read_report(compare) if compare is not None else None
    rows = _read_eval_rows(data, skip_bad, limit)
    import numpy as np

    from service.engine.loading import load_locator
    from service.jobs.evaluate import (
        eval_options,
        format_agreement,
        format_report,
        measure,
        top1_agreement,
    )

    name, _, version = index.partition("/")
    if not calibrated:
        s = s.model_copy(update={"calibration": "off"})
    loc = load_locator(s, index_name=name or None, index_version=version or None)
    opts = eval_options(
        s.locate_options(refine=refine, diversify=diversify, temperature=temperature),
        **({} if region_res is None else {"region_res": region_res}),
    )
    opts.validate(max_top_k=s.max_top_k, max_retrieve_k=s.max_retrieve_k)
    emb = _embed_rows(loc, rows, s, batch_size, image_stats=loc.judge is not None, grey_views=True)
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
        "image_runtime": {"runtime": s.image_runtime, "precision": s.image_precision},
        **rep,
        # Each image's top-1 (null: no candidate), so that another run can be compared with
        # this one image by image (--compare: e.g. the int8 runtime against torch).
        "answers": [
            {
                "image": str(row.path),
                "top1": [r.candidates[0].lat, r.candidates[0].lon] if r.candidates else None,
            }
            for row, r in zip(emb.rows, results, strict=True)
        ],
    }
    if other is not None:
        rep["agreement"] = top1_agreement(rep, other)
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
        if other is not None:
            typer.echo(format_agreement(rep, other))
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
    s = settings().model_copy(update={"calibration": "off"})
    rows = _read_eval_rows(data, skip_bad, limit)
    from encoders import get_profile
    from service.engine.loading import load_locator
    from service.engine.negatives import kinds_for
    from service.jobs.evaluate import fit_calibration

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
