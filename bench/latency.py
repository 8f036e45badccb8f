"""Per-image latency of the served pipeline, for two weights files in one run.

Each image is located alone (one request's path: decode is left out, the image tower, every
stage, the verdict), the two models alternating image by image so that both see the same
machine load. Each model gets the set-up `make run` serves (H3 land gallery, reference-image
index, calibration with its localizability verdict), built by bench/tilesets.py and shared
with bench/shift.py's cache. Last, the cost of reading colour ramps in the structure
descriptor (encoders.structure), with and without, alternating, on the test tiles and on the
same tiles drawn through the `jet` colour ramp.

    .venv/bin/python bench/latency.py --old OLD.pt [--new NEW.pt] [--images 200]
        [--refs N] [--calib 2000] [--res 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shift import _colormap
from tilesets import (
    CALIB_SEED,
    REF_SEED,
    TEST_SEED,
    bundled_weights,
    command_line,
    load_weights,
    machine_line,
    markdown_table,
    served_locator,
    tileset,
)

from encoders.structure import structure_descriptors
from service.config import Settings
from service.engine.locator import Locator
from service.engine.options import LocateOptions


def one(locator: Locator, image: Image.Image, options: LocateOptions) -> tuple[float, dict]:
    t = time.perf_counter()
    result = locator.locate([image], options)[0]
    return (time.perf_counter() - t) * 1000, result.timings_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--old", type=Path, required=True, help="weights file of the old model")
    ap.add_argument("--new", type=Path, default=None, help="default: the bundled weights")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--refs", type=int, default=Settings().setup_reference_tiles)
    ap.add_argument("--calib", type=int, default=2000)
    ap.add_argument("--res", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a worker's share)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    print(command_line())

    refs = tileset("reference", args.refs, REF_SEED)
    calib = tileset("train", args.calib, CALIB_SEED) if args.calib else []
    images = [Image.open(r.path).convert("RGB") for r in tileset("test", args.images, TEST_SEED)]
    named = {"old": args.old, "new": args.new or bundled_weights()}
    locators = {}
    for name, path in named.items():
        model, how = load_weights(path)
        locators[name], _ = served_locator(
            model, weights=path, res=args.res, refs=refs, calibration=calib
        )
        print(f"{name}: {path} ({how})")
    options = LocateOptions()
    for loc in locators.values():  # warm-up: lazy initialisations, caches
        one(loc, images[0], options)

    total: dict[str, list[float]] = {k: [] for k in locators}
    stages: dict[str, dict[str, list[float]]] = {k: {} for k in locators}
    for img in images:
        for name, loc in locators.items():
            ms, timings = one(loc, img, options)
            total[name].append(ms)
            for stage, v in timings.items():
                stages[name].setdefault(stage, []).append(v)

    names = sorted({s for d in stages.values() for s in d})
    rows = []
    for name in locators:
        med = statistics.median(total[name])
        judge = statistics.median(stages[name].get("judge", [0.0]))
        rows.append(
            [
                name,
                f"{med:.2f}",
                f"{statistics.quantiles(total[name], n=20)[-1]:.2f}",
                *(f"{statistics.median(stages[name].get(s, [0.0])):.2f}" for s in names),
                f"{100 * judge / med:.1f} %",
            ]
        )
    print(
        f"\n{len(images)} held-out test tiles (seed {TEST_SEED}), one at a time, "
        f"{args.threads} torch thread(s), default options; ms per image (median, p95) and "
        "median ms per stage"
    )
    print(markdown_table(["model", "median", "p95", *names, "verdict share"], rows))
    ratio = statistics.median(total["new"]) / statistics.median(total["old"])
    print(f"\nnew / old median per-image latency: {ratio:.2f}x")
    ramps_cost(locators["new"], images, statistics.median(total["new"]))


def ramps_cost(locator: Locator, images: list[Image.Image], request_ms: float) -> None:
    """What reading colour ramps adds: a picture's luminance layout alone against what the
    service reads before the pipeline (``Locator.read``: ramps read, those of unsure direction
    turned the way their best reference match runs, and grey views drawn), alternating picture
    by picture; and, located as served, the second pass of the pictures read as ramps (their
    grey views through the tower and the pipeline, ``grey_view``). For the test tiles and the
    same tiles drawn through `jet`; ms per picture (median)."""
    jet = _colormap("jet")
    options = LocateOptions()
    for name, pictures in (("test tiles", images), ("the same in jet", [jet(i) for i in images])):
        spent: dict[bool, list[float]] = {False: [], True: []}
        for img in pictures:
            for served in (False, True):
                t = time.perf_counter()
                locator.read([img]) if served else structure_descriptors([img])
                spent[served].append((time.perf_counter() - t) * 1000)
        plain, ramps = (statistics.median(spent[f]) for f in (False, True))
        print(
            f"reading per picture, {name}: {plain:.3f} ms of luminance alone, {ramps:.3f} ms "
            f"served, reading colour ramps and the colour thumbnail (+{ramps - plain:.3f} ms, "
            f"{100 * (ramps - plain) / request_ms:.1f} % of the new model's median request)"
        )
        second, total = [], []
        for img in pictures:
            t = time.perf_counter()
            timings = locator.locate([img], options)[0].timings_ms
            if "grey_view" in timings:
                total.append((time.perf_counter() - t) * 1000)
                second.append(timings["grey_view"])
        if second:
            print(
                f"  {len(second)} of {len(pictures)} read as ramps; their grey views' second "
                f"pass {statistics.median(second):.2f} ms of a {statistics.median(total):.2f} ms "
                "request (median)"
            )


if __name__ == "__main__":
    main()
