"""`geoloc locate`: images or a description of a place, from the terminal.

Everything the user gave is checked (options, files) before the model is imported or loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from service.cli.common import fail, friendly_errors, settings

if TYPE_CHECKING:
    from service.config import Settings


def _load_images(paths: list[Path], s: Settings) -> tuple[list[Any], list[Path], list[str]]:
    from service.engine.images import read_image_files

    dirs = [p for p in paths if p.is_dir()]
    files = [p for p in paths if not p.is_dir()]
    images, ok, problems = read_image_files(files, s.image_limits())
    problems = [
        f"[file-not-found] {p} is a directory, not an image file: give the images in it "
        f"(e.g. {p / '*.jpg'})"
        for p in dirs
    ] + problems
    return images, [files[i] for i in ok], problems


def verdict_line(verdict: dict[str, Any]) -> str:
    """'not_locatable (0.03): unlike the satellite views ...' for a localizability verdict."""
    line = f"{verdict['verdict']} ({verdict['score']:.2f}): {verdict['reason']}"
    return line + ("; abstained" if verdict["abstained"] else "")


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
    from index.geo import BBox

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
        neighbours=neighbours,
    )
    if not text and not images:
        fail('nothing to locate: give image files (JPEG, PNG, WebP), or --text "a description"')
    if text and images:
        fail('give image files, or --text "a description of a place", not both')
    problems: list[str] = []
    if text:
        from service.engine.options import text_query

        query = text_query(text, s.max_text_chars)  # checked before the model loads
        from service.engine.loading import load_locator

        loc = load_locator(s, index_name=name or None, index_version=version or None)
        results = loc.locate_texts([query], opts)
        labels = [("text", query)]
    else:
        pil, ok, problems = _load_images(images or [], s)
        for p in problems:
            typer.echo(f"error: {p}", err=True)
        if not pil:
            raise typer.Exit(2)
        from service.engine.loading import load_locator

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
