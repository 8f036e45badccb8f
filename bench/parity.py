"""Worse than the pixel baseline, or an unlucky draw? The served pipeline and the pixel
nearest-neighbour baseline on several fresh validation draws of the same kind of picture.

bench/shift.py reports 400 pictures a set; a share near 95 % then moves by about a point from
one draw to the next, and a set where the pipeline trails the baseline by a point or two may be
chance. This bench draws ``--draws`` more sets of ``--per-set`` pictures of each named kind
(clean land tiles 470-1,180 km wide through one of bench/shift.py's shifts, drawn from one of
its other Earth renderings, or ``zoom<km>``: clean tiles that wide), never the reported ones
(validation seeds, bench/tune.py's ``VAL_SEED`` with the draw's number), and prints for each
threshold both shares over all draws and the paired difference, pipeline minus baseline
(picture by picture: +1 where only the pipeline is within it, -1 where only the baseline is),
with its 95 % interval (mean +- 1.96 standard errors). An interval wholly below zero says the
pipeline is worse; one that holds zero says the draws cannot tell them apart.

    .venv/bin/python bench/parity.py [--kinds blur,jpeg8,lsmask] [--draws 5] [--per-set 400]
        [--first-draw 0]

``--first-draw 5`` gives draws 5-9: other pictures than the reported 0-4, for choosing.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shift import RENDERINGS, SHIFTS, run_tiles
from tilesets import (
    PixelBaseline,
    bundled_weights,
    command_line,
    machine_line,
    markdown_table,
    served_setup,
)
from tune import validation_draw

from service.config import Settings
from service.engine.images import read_image_file

SHOWN_KM = (25, 200, 750, 2500)


def kind_draw(kind: str, n: int, draw: int) -> list:
    """Draw number ``draw`` of ``n`` pictures of ``kind``."""
    name = f"parity-{kind}-{draw}"
    if kind.startswith("zoom"):
        return validation_draw(name, n, float(kind[4:]), lambda im: im, salt=(draw,))
    if kind in SHIFTS:
        return validation_draw(name, n, None, SHIFTS[kind][1], salt=(draw,))
    if kind in RENDERINGS:
        return validation_draw(name, n, None, lambda im: im, (draw,), kind)
    raise SystemExit(
        f"unknown kind {kind!r}: one of {', '.join([*SHIFTS, *RENDERINGS])} or zoom<km>"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kinds", default="blur,jpeg8,lsmask")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--first-draw", type=int, default=0, help="number of the first draw")
    ap.add_argument("--per-set", type=int, default=400)
    ap.add_argument("--calib", type=int, default=2000)
    ap.add_argument("--res", type=int, default=4)
    args = ap.parse_args()
    t0 = time.perf_counter()
    print(f"command: {command_line()}")
    print(machine_line())
    weights = bundled_weights().resolve()
    _, _, refs, _, locator, settings = served_setup(
        weights, args.res, Settings().setup_reference_tiles, args.calib
    )
    options = settings.locate_options()
    baseline = PixelBaseline(refs)
    load = partial(read_image_file, limits=settings.image_limits())
    rows = []
    for kind in args.kinds.split(","):
        results = [
            run_tiles(kind, kind_draw(kind, args.per_set, d), locator, options, baseline, load)
            for d in range(args.first_draw, args.first_draw + args.draws)
        ]
        pixel = np.concatenate([r.pixel_km for r in results])
        ours = np.concatenate([r.pipeline_km for r in results])
        for t in SHOWN_KM:
            diff = (ours <= t).astype(float) - (pixel <= t)
            half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
            per_draw = " / ".join(
                f"{100 * (np.mean(r.pipeline_km <= t) - np.mean(r.pixel_km <= t)):+.1f}"
                for r in results
            )
            rows.append(
                (
                    kind,
                    f"{t:,}",
                    f"{100 * np.mean(pixel <= t):.1f} %",
                    f"{100 * np.mean(ours <= t):.1f} %",
                    f"{100 * diff.mean():+.1f} [{100 * (diff.mean() - half):+.1f}, "
                    f"{100 * (diff.mean() + half):+.1f}]",
                    per_draw,
                )
            )
        print(f"{kind}: {len(ours)} pictures", flush=True)
    print(
        f"\n{args.draws} draws of {args.per_set} pictures a kind (validation seeds); points, "
        "pipeline minus pixel NN\n"
    )
    print(
        markdown_table(
            [
                "kind",
                "within km",
                "pixel NN",
                "pipeline",
                "difference [95 % interval]",
                "difference in each draw",
            ],
            rows,
        )
    )
    print(f"\nwall time {time.perf_counter() - t0:,.0f} s")


if __name__ == "__main__":
    main()
