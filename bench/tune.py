"""How the verification's reference-neighbour settings were chosen: a grid over
``neighbour_weight``, ``neighbour_kernel_km``, ``neighbour_temperature`` and
``structure_weight`` on *validation*
draws that bench/shift.py never reports (other seeds, other widths, other shift parameters),
in the set-up `make run` serves.

Every set is embedded once; each setting reruns the pipeline after the image tower. Printed:
per setting, the mean over the sets of the shares within 25/200/750/2,500 km and the worst
set's 200 km share.

    .venv/bin/python bench/tune.py [--weights PATH] [--per-set 300] [--refs N] \
        [--grid neighbours|structure|support|precision|widths|colour|near_copy|\
        colour_search|served] \
        [--ref-power P] [--snap]

``--ref-power`` draws the reference tiles with another ``scale_power`` (how many narrow views
the reference set holds against wide ones); ``--grid served`` runs the served settings only.
``--snap`` prints, instead of a grid, what answering with the picture's top reference neighbour
(ranked as verification ranks them) would give against the served top-1, per set, alone and
where that neighbour's structure correlation reaches a threshold, beside the pixel baseline.
``--ramps`` prints the served top-1 with structure descriptors of luminance alone against
the served ones (along colour ramps, those of unsure direction turned the way their best
reference match runs: encoders.structure, Locator.orient), on the validation sets plus six
more ramps, and how often each set's pictures are laid out along a ramp, unsure, turned round.
``--deblock`` prints the served top-1 with the pictures decoded as the service decodes them,
at several GEOLOC_DEBLOCK_ABOVE thresholds (0: never smoothed), on the validation sets plus
JPEG quality 6 and 400 of the calibration's TRAIN_STYLE tiles (in-domain JPEG 35-95).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shift import (
    RENDERINGS,
    SIZE,
    _blur,
    _colormap,
    _gamma,
    _grayscale,
    _haze,
    _hue,
    _jpeg,
    scale_for,
)
from tilesets import (
    CALIB_SEED,
    OUT,
    REF_SEED,
    STYLES,
    PixelBaseline,
    bundled_weights,
    cached_set,
    command_line,
    embed,
    latlon,
    load_weights,
    luminance_descriptors,
    machine_line,
    markdown_table,
    read_pictures,
    read_rows,
    served_locator,
    short_hash,
    tileset,
    write_labelled,
)

from encoders.bluemarble import ATLAS_TINTS, load_map, render_tile, sample_centres
from encoders.structure import picture_descriptors
from index.geo import is_land
from service.config import Settings
from service.engine import locator as pipeline
from service.engine.images import blockiness, read_image_file
from service.engine.options import LocateOptions
from service.engine.scores import errors_km

#: Validation draws only: seeds and parameters distinct from bench/shift.py's reported sets.
VAL_SEED = 50501
#: The event the stated probabilities are calibrated for (GEOLOC_CALIBRATION_KM's default).
CALIBRATION_KM = Settings().calibration_km
VAL_WIDTHS_KM = (250, 300, 600, 1200, 1800)
VAL_SHIFTS = {
    "gray": _grayscale,
    "hue135": _hue(135.0),
    "gamma0.6": _gamma(0.6),
    "jpeg12": _jpeg(12),
    "blur2": _blur(2.0),
    "haze0.55": _haze(0.55, np.array([0.92, 0.90, 0.88], np.float32)),
    "magma": _colormap("magma"),
}
#: More colour ramps for --ramps (bench/shift.py reports viridis and terrain): rising and
#: falling luminance (jet, turbo, the diverging RdYlGn, coolwarm and BrBG) or rising
#: (gist_earth, cubehelix), and an atlas's hypsometric tints, whose curve turns sharply at
#: pale yellow and at brown (encoders.bluemarble.ATLAS_TINTS).
VAL_RAMPS = ("jet", "turbo", "RdYlGn", "coolwarm", "BrBG", "gist_earth", "cubehelix", "hypsometric")
GRIDS = {
    "neighbours": {
        "neighbour_weight": (0.0, 1.0, 3.0),
        "neighbour_kernel_km": (25.0, 50.0),
        "neighbour_temperature": (50.0, 200.0),
        "structure_weight": (0.0, 0.25, 0.5, 1.0),
    },
    # STRUCTURE_SEARCH is the pipeline's constant: references found by structure alone.
    "structure": {
        "STRUCTURE_SEARCH": (0, 50, 200),
        "structure_weight": (0.25, 0.5, 1.0, 2.0),
    },
    # How far the neighbours (now found by structure as well) may pull the answer.
    "support": {
        "neighbour_weight": (1.0, 2.0, 3.0),
        "structure_weight": (1.0, 1.5, 2.0),
    },
    # How sharply the neighbours place the answer (the 25 km share) once references are dense.
    "precision": {
        "neighbour_weight": (1.0, 2.0, 3.0),
        "neighbour_kernel_km": (25.0, 50.0),
        "neighbour_temperature": (50.0, 200.0),
    },
    # How sharply each neighbour places the answer, from the width of its view (references
    # with a width_km column); 0 is one kernel for all.
    "widths": {
        "neighbour_kernel_share": (0.0, 0.06, 0.1, 0.15),
        "neighbour_weight": (1.0,),
    },
    # How much a close colour match ranks a reference neighbour up, and from how close.
    "colour": {
        "colour_weight": (0.0, 0.25, 0.5, 1.0),
        "colour_threshold": (0.6, 0.75, 0.85),
    },
    # When the first reference neighbour is a near copy whose place is made first: how close
    # its colours must be and how narrow its view (0 km: never).
    "near_copy": {
        "near_copy_colour": (0.3, 0.5, 0.7),
        "near_copy_km": (0.0, 300.0, 400.0, 600.0),
    },
    # How many references found by colour alone join the shortlist (a module constant).
    "colour_search": {"COLOUR_SEARCH": (0, 50)},
    # The served settings alone (to compare reference sets, --ref-power).
    "served": {"structure_weight": (LocateOptions().structure_weight,)},
}


def copied(result) -> bool:
    """Whether an answer's first place is a reference's, as a near copy of the picture."""
    return pipeline.NEAR_COPY in result.stages


def validation_draw(
    name: str,
    n: int,
    width_km: float | None,
    shift,
    salt: tuple = (),
    rendering: str | None = None,
) -> list:
    """``n`` clean land tiles ``width_km`` wide (None: log-uniform over 470-1,180 km, as the
    shifted sets), each passed through ``shift``: a validation draw of its own (seeded by
    VAL_SEED, the length of ``name`` and ``salt``: sets whose names are as long share their
    places, a paired design), cached under bench/out. ``rendering``: one of bench/shift.py's
    other Earth images to draw the tiles from (default bmng.jpg)."""

    def write(tmp: Path) -> None:
        rng = np.random.default_rng([VAL_SEED, len(name), *salt])
        centres = sample_centres(n, rng, is_land, sea_weight=0.0)
        if width_km is None:
            widths = np.exp(rng.uniform(np.log(470.0), np.log(1180.0), n))
        else:
            widths = np.full(n, float(width_km))
        earth = load_map() if rendering is None else RENDERINGS[rendering][1]()
        write_labelled(
            tmp,
            (
                (shift(render_tile(a, o, scale_for(w), SIZE, earth)), a, o)
                for (a, o), w in zip(centres.tolist(), widths.tolist(), strict=True)
            ),
        )

    drawn = (width_km, salt, rendering)
    # Sets cached before these arguments existed keep their folders.
    key = "" if drawn == (None, (), None) else f"-{short_hash(drawn)}"
    return read_rows(cached_set(OUT / f"val-{name}-{n}-{VAL_SEED}-{SIZE}px{key}", write))


def register_hypsometric() -> None:
    import matplotlib
    from matplotlib.colors import LinearSegmentedColormap

    if "hypsometric" not in matplotlib.colormaps:
        ramp = LinearSegmentedColormap.from_list("hypsometric", ATLAS_TINTS.tolist())
        matplotlib.colormaps.register(ramp)


def validation_sets(n: int) -> dict[str, list]:
    """The validation draws, and ``n`` tiles drawn as the test tiles are (the training
    distribution's zooms and colour changes) with the validation seed."""
    sets = {f"{w} km": validation_draw(f"zoom{w}", n, w, lambda im: im) for w in VAL_WIDTHS_KM}
    sets.update({name: validation_draw(name, n, None, f) for name, f in VAL_SHIFTS.items()})
    sets["test style"] = tileset("test", n, VAL_SEED)
    # A codec harsher than jpeg12's, which smears the texture and keeps the colours.
    sets["jpeg8"] = validation_draw("jpeg8v", n, None, _jpeg(8), salt=(11,))
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--per-set", type=int, default=300)
    ap.add_argument("--refs", type=int, default=Settings().setup_reference_tiles)
    ap.add_argument("--res", type=int, default=4)
    ap.add_argument("--grid", choices=sorted(GRIDS), default="neighbours")
    ap.add_argument("--ref-power", type=float, default=None)
    ap.add_argument("--snap", action="store_true", help="the top-neighbour diagnostic")
    ap.add_argument("--deblock", action="store_true", help="the JPEG smoothing thresholds")
    ap.add_argument("--ramps", action="store_true", help="descriptors along colour ramps")
    args = ap.parse_args()
    if args.ref_power is not None:
        STYLES["reference"] = replace(STYLES["reference"], scale_power=args.ref_power)
        print(f"reference tiles: {STYLES['reference']}")
    grid = GRIDS[args.grid]
    print(machine_line())
    print(command_line())
    weights = args.weights or bundled_weights()
    model, how = load_weights(weights)
    print(f"weights: {weights} ({how})")
    refs = tileset("reference", args.refs, REF_SEED)
    locator, _ = served_locator(model, weights=weights, res=args.res, refs=refs)
    sets = validation_sets(args.per_set)
    if args.ramps:
        register_hypsometric()
        for name in VAL_RAMPS:
            sets[name] = validation_draw(name, args.per_set, None, _colormap(name))
    if args.deblock:
        deblock_table(locator, sets, args.per_set)
        return
    embedded = {
        name: (embed(model, rows), read_pictures(rows, locator), latlon(rows))
        for name, rows in sets.items()
    }  # one pass through the image tower per set
    if args.snap:
        snap_table(locator, sets, embedded, PixelBaseline(refs))
        return
    if args.ramps:
        ramps_table(locator, sets, embedded)
        return

    rows_out = []
    names = list(grid)
    for values in itertools.product(*grid.values()):
        setting = dict(zip(names, values, strict=True))
        for name in [n for n in setting if n.isupper()]:  # a module constant, not an option
            setattr(pipeline, name, setting.pop(name))
        opts = LocateOptions(top_k=1, **setting)
        shares, copies = [], []
        for q, read, truth in embedded.values():
            res = locator.locate_embeddings(q, opts, **read)
            pred = np.array([[r.candidates[0].lat, r.candidates[0].lon] for r in res])
            d = errors_km(pred, truth)
            shares.append([np.mean(d <= t) for t in (25, 200, 750, 2500)])
            copies += [
                (r.candidates[0].probability, e) for r, e in zip(res, d, strict=True) if copied(r)
            ]
        s = np.array(shares)
        rows_out.append(
            (
                *(f"{v:g}" for v in values),
                *(f"{100 * m:.1f} %" for m in s.mean(0)),
                f"{100 * s[:, 1].min():.1f} %",
            )
        )
        per_set = (
            f"{n} {100 * v[0]:.0f}/{100 * v[1]:.0f}/{100 * v[2]:.0f}/{100 * v[3]:.0f}"
            for n, v in zip(sets, s, strict=True)
        )
        print("  ", ", ".join(per_set), flush=True)
        if copies:  # what the first place of a near copy states, against how often it holds
            p, e = np.array(copies).T
            print(
                f"   near copies: {len(e)}, stated {100 * p.mean():.1f} %, within "
                f"{CALIBRATION_KM:g} km {100 * np.mean(e <= CALIBRATION_KM):.1f} %",
                flush=True,
            )
        print(" ".join(rows_out[-1]), flush=True)
    print(
        f"\nvalidation sets (seed {VAL_SEED}, {args.per_set} each): "
        f"{', '.join(sets)}; top-1 of the full pipeline"
    )
    print(
        markdown_table(
            [*names, *(f"mean {t} km" for t in (25, 200, 750, 2500)), "worst 200 km"], rows_out
        )
    )


DEBLOCK_AT = (0.0, 5.0, 3.0)


def deblock_table(locator, sets: dict, n: int) -> None:
    """Served top-1 within 25/200/750/2,500 km per set, the pictures read through
    ``read_image_file`` with each threshold, and the share of pictures smoothed."""
    sets = dict(sets)
    sets["jpeg6"] = validation_draw("jpeg6x", n, None, _jpeg(6), salt=(7,))
    sets["train style"] = tileset("train", 2000, CALIB_SEED)[:400]
    opts = LocateOptions(top_k=1)
    rows = []
    limits = Settings().image_limits()
    for name, items in sets.items():
        truth = latlon(items)
        row = [name]
        raw = [
            blockiness(read_image_file(r.path, replace(limits, deblock_above=0.0))) for r in items
        ]
        for t in DEBLOCK_AT:
            pictures = [read_image_file(r.path, replace(limits, deblock_above=t)) for r in items]
            smoothed = np.mean([b >= t for b in raw]) if t else 0.0
            res = locator.locate(pictures, opts)
            d = errors_km(
                np.array([[r.candidates[0].lat, r.candidates[0].lon] for r in res]), truth
            )
            row.append(
                "/".join(f"{100 * np.mean(d <= k):.1f}" for k in (25, 200, 750, 2500))
                + f" ({100 * smoothed:.0f} % smoothed)"
            )
        rows.append(row)
        print(" | ".join(row), flush=True)
    print(markdown_table(["set", *(f"threshold {t:g}" for t in DEBLOCK_AT)], rows))


SNAP_AT = (0.7, 0.8, 0.9)
SHOWN = (25, 200, 750)


def snap_table(locator, sets: dict, embedded: dict, baseline: PixelBaseline) -> None:
    """Served top-1 against the top reference neighbour's location (as verification ranks the
    neighbours: cosine + structure_weight·correlation), per set; within 25/200/750 km."""
    opts = LocateOptions(top_k=1)
    temperature = locator.temperature(opts)
    rows = []
    for name, (q, read, truth) in embedded.items():
        res = locator.locate_embeddings(q, opts, **read)
        served = np.array([[r.candidates[0].lat, r.candidates[0].lon] for r in res])
        scored = locator._score(q, opts, temperature, read["structure"], read["colour"])
        top = np.array([[s.neighbours[0]["lat"], s.neighbours[0]["lon"]] for s in scored])
        corr = np.array([s.neighbours[0].get("structure") or 0.0 for s in scored])
        d_served, d_top = errors_km(served, truth), errors_km(top, truth)
        d_pixel = errors_km(baseline.predict([r.path for r in sets[name]]), truth)
        cells = [d_pixel, d_served, d_top, *(np.where(corr >= t, d_top, d_served) for t in SNAP_AT)]
        rows.append(
            [name, *("/".join(f"{100 * np.mean(d <= t):.1f}" for t in SHOWN) for d in cells)]
        )
        print(" | ".join(rows[-1]), flush=True)
    header = ["set", "pixel NN", "served", "top neighbour"]
    header += [f"top neighbour where structure ≥ {t:g}" for t in SNAP_AT]
    print(markdown_table(header, rows))


def ramps_table(locator, sets: dict, embedded: dict) -> None:
    """Served top-1 within 25/200/750 km per set with luminance descriptors, with descriptors
    along colour ramps (those of unsure direction turned the way their best reference match
    runs), and as served (those and the grey views); and the shares of pictures laid out
    otherwise than by luminance, of unsure direction, turned round, and answered from their
    grey view."""
    opts = LocateOptions(top_k=1)
    table = []
    for name, (q, read, truth) in embedded.items():
        served, views, colour = read["structure"], read["views"], read["colour"]
        reading = picture_descriptors([Image.open(r.path) for r in sets[name]])
        along = reading.descriptors
        luminance = luminance_descriptors(sets[name])
        row = [name]
        for changed in (
            np.any(along != luminance, axis=1),
            reading.unsure,
            np.any(served != along, 1),
        ):
            row.append(f"{100 * np.mean(changed):.1f} %")
        answers = {}
        for label, desc, seen in (
            ("luminance", luminance, None),
            ("along", served, None),
            ("served", served, views),
        ):
            answers[label] = locator.locate_embeddings(
                q, opts, structure=desc, views=seen, colour=colour
            )
        grey = np.mean(["grey_view" in r.stages for r in answers["served"]])
        row.append(f"{100 * grey:.1f} %")
        for res in answers.values():
            d = errors_km(
                np.array([[r.candidates[0].lat, r.candidates[0].lon] for r in res]), truth
            )
            row.append("/".join(f"{100 * np.mean(d <= t):.1f}" for t in SHOWN))
        table.append(row)
        print(" | ".join(row), flush=True)
    header = [
        "set",
        "along a ramp",
        "unsure",
        "turned round",
        "grey view",
        "luminance",
        "along ramps",
        "served",
    ]
    print(markdown_table(header, table))


if __name__ == "__main__":
    main()
