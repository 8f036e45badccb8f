"""`geoloc locate`: images or a description of a place, from the terminal.

Everything the user gave is checked (options, files) before the model is imported or loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from service.cli.common import friendly_errors, settings, usage_error

if TYPE_CHECKING:
    from service.config import Settings
    from service.engine.album import AlbumResult
    from service.engine.results import LocateResult


def _load_images(paths: list[Path], s: Settings) -> tuple[list[Any], list[Path], list[str]]:
    from service.engine.images import read_image_files

    dirs = [p for p in paths if p.is_dir()]
    files = [p for p in paths if not p.is_dir()]
    images, ok, problems = read_image_files(files, s.image_limits())
    problems = [
        f"[is-a-directory] {p} is a directory, not an image file: pass the image files in it, "
        f"e.g. {p / '*.jpg'}"
        for p in dirs
    ] + problems
    return images, [files[i] for i in ok], problems


def verdict_line(verdict: dict[str, Any]) -> str:
    """'not_locatable (0.03): unlike the satellite views ...' for a localizability verdict."""
    line = f"{verdict['verdict']} ({verdict['score']:.2f}): {verdict['reason']}"
    return line + ("; abstained" if verdict["abstained"] else "")


def json_results(labels: list[str], results: list[LocateResult], llm_reason: str) -> str:
    """``{"results": [{"input": ..., "result": ...}]}``, whatever the number of inputs; each
    result is the body that POST /v1/locate answers, built by the same function."""
    from service.api.operations import locate_response
    from service.engine.llm_stages import skipped

    out = [
        {
            "input": label,
            "result": locate_response(r, None, [], skipped(llm_reason)).model_dump(mode="json"),
        }
        for label, r in zip(labels, results, strict=True)
    ]
    return json.dumps({"results": out}, indent=2, ensure_ascii=False)


def table_lines(label: str, r: LocateResult, within_km: float) -> list[str]:
    """One input's candidates under a header that names the columns."""
    lines = [f"{label}  ({r.profile}, index {r.index})"]
    verdict = r.localizability
    if verdict is not None and verdict["verdict"] != "located":
        lines.append(f"  {verdict_line(verdict)}")
    p_col = f"p(≤{within_km:g} km)"
    lines.append(f"  rank       lat        lon  {p_col}  h3 cell          place")
    for i, c in enumerate(r.candidates, 1):
        place = ", ".join(x for x in (c.city, c.admin1, c.country) if x) or "at sea"
        lines.append(
            f"  {i:4d} {c.lat:9.4f} {c.lon:10.4f}  {c.probability:{len(p_col)}.3f}  {c.h3:15s}  "
            + place
            + ("" if c.reliable else "  (unreliable)")
        )
    if r.region:
        lines.append(
            f"  region: {len(r.region['cells'])} cells, "
            f"{r.region['area_km2']:.0f} km² hold {r.region['covered']:.0%}"
        )
    return lines


def probability_legend(within_km: float, calibrated: bool) -> str:
    how = "as calibrated by" if calibrated else "not calibrated yet: run"
    return (
        f"p(≤{within_km:g} km): the probability that the true location is within "
        f"{within_km:g} km of the point ({how} `geoloc calibrate`). region: the fewest H3 "
        "cells that hold the stated share of the probability."
    )


def album_json(result: AlbumResult, paths: list[Path]) -> str:
    """``{"results": [{"input": [FILE, ...], "result": ...}]}``: one result, the body that
    POST /v1/locate/album answers, built by the same function."""
    from service.api.operations import album_response
    from service.engine.llm_stages import skipped

    labels = [str(p) for p in paths]
    llm = skipped("albums do not use the LLM stages")
    body = album_response(result, list(labels), list(range(len(labels))), {}, [], llm)
    out = {"results": [{"input": labels, "result": body.model_dump(mode="json")}]}
    return json.dumps(out, indent=2, ensure_ascii=False)


def album_lines(result: AlbumResult, paths: list[Path], within_km: float) -> list[str]:
    """The joint answer's table, then one line per image: its weight in the joint answer, its
    agreement with it, its own top-1, and whether it is an outlier."""
    lines = table_lines(f"album of {len(paths)} images (joint answer)", result.joint, within_km)
    for path, own, part in zip(paths, result.images, result.parts(), strict=True):
        top = own.candidates[0] if own.candidates else None
        where = f"own top-1 {top.lat:.4f}, {top.lon:.4f}" if top else "no candidate"
        lines.append(
            f"  {path}: weight {part['weight']:.2f}, agreement {part['agreement']:.2f}, {where}"
            + ("  (outlier)" if part["outlier"] else "")
        )
    return lines


JSON_HELP = (
    'Print one JSON object, {"results": [{"input": FILE or TEXT, "result": {...}}]}, for one '
    "input or many. Each result has the fields of the HTTP answer of POST /v1/locate; its "
    "prediction_id is null (the command line records no prediction). Files that cannot be "
    "read are reported on stderr, not in the JSON."
)


@friendly_errors
def locate_cmd(
    images: Annotated[
        list[Path] | None, typer.Argument(metavar="IMAGE", help="Image files (JPEG, PNG, WebP).")
    ] = None,
    text: Annotated[
        str,
        typer.Option(
            "--text",
            metavar="TEXT",
            help="Locate this description of a place instead of images (profiles with a "
            "text tower, e.g. geoclip).",
        ),
    ] = "",
    top_k: Annotated[int | None, typer.Option(metavar="N", help="Candidates per image.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    profile: Annotated[str, typer.Option(metavar="NAME", help="Model profile.")] = "",
    index: Annotated[
        str, typer.Option(metavar="NAME[/VERSION]", help="Index NAME or NAME/VERSION.")
    ] = "",
    refine: Annotated[bool, typer.Option(help="H3 refinement stage.")] = True,
    diversify: Annotated[bool, typer.Option(help="Spatial NMS stage.")] = True,
    verify: Annotated[bool, typer.Option(help="Verification stage.")] = True,
    bbox: Annotated[
        str, typer.Option(metavar="S,W,N,E", help="Search only in south,west,north,east.")
    ] = "",
    country: Annotated[
        list[str] | None,
        typer.Option(metavar="CODE", help="Search only in these ISO codes (repeat the option)."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, metavar="N", help="Images per model batch.")
    ] = 16,
    neighbours: Annotated[
        int | None, typer.Option(metavar="N", help="Reference images to retrieve.")
    ] = None,
    album: Annotated[
        bool,
        typer.Option(
            "--album",
            help="The images show one place: answer jointly (2 to GEOLOC_MAX_ALBUM images), "
            "with each image's weight and whether it is an outlier.",
        ),
    ] = False,
    spread_km: Annotated[
        float | None,
        typer.Option(
            metavar="KM",
            help="With --album: how far apart the images may have been taken (one standard "
            "deviation, 0 to 2,000; default GEOLOC_ALBUM_SPREAD_KM; 0: one spot).",
        ),
    ] = None,
) -> None:
    """Locate images (several are encoded as one batch), or a description with --text."""
    if not text and not images:
        usage_error(
            "nothing to locate: give image files (JPEG, PNG, WebP), e.g. photos/*.jpg, "
            'or --text "a description of a place"',
        )
    if text and images:
        usage_error('give image files, or --text "a description of a place", not both')
    if album and text:
        usage_error("--album locates images of one place; it does not take --text")
    if spread_km is not None:
        from service.engine.options import MAX_SPREAD_KM  # light commands import it late

        if not album:
            usage_error("--spread-km is how far apart an album's images were taken: add --album")
        if not 0 <= spread_km <= MAX_SPREAD_KM:
            usage_error(f"--spread-km must be 0 to {MAX_SPREAD_KM:,.0f} km; got {spread_km:g}")
    from index.geo import BBox

    s = settings()
    if album and not 2 <= len(images or []) <= s.max_album:
        usage_error(
            f"--album takes 2 to {s.max_album} images (GEOLOC_MAX_ALBUM); {len(images or [])} given"
        )
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
        neighbours=neighbours,
    )
    problems: list[str] = []
    if text:
        from service.engine.options import text_query

        query = text_query(text, s.max_text_chars)  # checked before the model loads
        from service.engine.loading import load_locator

        loc = load_locator(s, index_name=name or None, index_version=version or None)
        results = loc.locate_texts([query], opts)
        labels = [query]
        llm_reason = "text queries do not use the LLM stages"
    else:
        pil, ok, problems = _load_images(images or [], s)
        for p in problems:
            typer.echo(f"error: {p}", err=True)
        if not pil:
            raise typer.Exit(2)
        from service.engine.loading import load_locator

        if album and len(pil) < 2:
            typer.echo("error: an album needs at least 2 images that can be read", err=True)
            raise typer.Exit(2)
        loc = load_locator(s, index_name=name or None, index_version=version or None)
        if album:
            joint = loc.locate_album(pil, opts, s.album_config(spread_km))
            within_km = loc.calibration.within_km if loc.calibration else s.calibration_km
            typer.echo(
                album_json(joint, ok)
                if as_json
                else "\n".join(
                    [
                        *album_lines(joint, ok, within_km),
                        probability_legend(within_km, loc.calibration is not None),
                    ]
                )
            )
            if problems:
                raise typer.Exit(1)
            return
        results = []
        for start in range(0, len(pil), batch_size):
            results += loc.locate(pil[start : start + batch_size], opts)
        labels = [str(p) for p in ok]
        llm_reason = "geoloc locate does not run the LLM stages"
    if as_json:
        typer.echo(json_results(labels, results, llm_reason))
    else:
        calibration = loc.calibration
        within_km = calibration.within_km if calibration is not None else s.calibration_km
        for label, r in zip(labels, results, strict=True):
            typer.echo("\n".join(table_lines(label, r, within_km)))
        typer.echo(probability_legend(within_km, calibration is not None))
    if problems:
        raise typer.Exit(1)
