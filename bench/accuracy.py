"""What each pipeline stage adds, on the held-out Blue Marble test (bundled model).

Rows: a pixel-space nearest-neighbour baseline over the reference tiles, gallery
retrieval alone (GeoCLIP-style, fixed H3 land gallery), + H3 refinement,
+ reference-image neighbours, + diversify/verify (the full pipeline). Top-1 error.

    .venv/bin/python bench/accuracy.py [--test 2000] [--refs 300000] [--res 4] \
        [--runtime torch-fp32,onnx-fp32,onnx-int8]

With several --runtime values the test tiles are embedded by each image-tower runtime
(encoders.runtime; the indexes stay as built) and each gets its table, then the share of
tiles whose full-pipeline top-1 is the same as the first runtime's (within 1 and 25 km).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tilesets import (
    REF_SEED,
    TEST_SEED,
    PixelBaseline,
    bundled_weights,
    embed,
    latlon,
    machine_line,
    read_pictures,
    served_locator,
    tileset,
)

from encoders import load_model
from encoders.runtime import load_image_runtime
from service.engine.options import LocateOptions
from service.engine.scores import errors_km, summarize_distances


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--refs", type=int, default=300000)
    ap.add_argument("--res", type=int, default=4)
    ap.add_argument("--runtime", default="torch-fp32", help="RUNTIME-PRECISION[,...]")
    args = ap.parse_args()
    runtimes = [tuple(r.split("-", 1)) for r in args.runtime.split(",")]
    print(machine_line())
    test = tileset("test", args.test, TEST_SEED)
    refs = tileset("reference", args.refs, REF_SEED)
    truth = latlon(test)

    model = load_model("bluemarble")
    locator, _ = served_locator(
        model,
        weights=bundled_weights(),
        res=args.res,
        refs=refs,
    )

    rows: list[tuple[str, np.ndarray, float]] = []
    baseline = PixelBaseline(refs)
    t = time.perf_counter()
    rows.append(
        (
            "pixel nearest neighbour (reference tiles)",
            baseline.predict([r.path for r in test]),
            (time.perf_counter() - t) / len(test),
        )
    )

    read = read_pictures(test, locator)
    tables = []
    with tempfile.TemporaryDirectory() as exported:
        for runtime, precision in runtimes:
            load_image_runtime(model, Path(exported), runtime, precision, release=False)
            table = [*rows, *pipeline_rows(model, locator, test, read, args.res)]
            tables.append((f"{runtime} {precision}", table))
    for name, table in tables:
        print_table(name, table, truth, test, refs, args.res, len(locator.index))
    if len(tables) > 1:
        first = tables[0][1][-1][1]
        for name, table in tables[1:]:
            d = errors_km(table[-1][1], first)
            print(
                f"{name}: full-pipeline top-1 the same as {tables[0][0]}'s on "
                f"{100 * np.mean(d <= 1):.1f} % of test tiles within 1 km, "
                f"{100 * np.mean(d <= 25):.1f} % within 25 km"
            )


def pipeline_rows(model, locator, test, read: dict, res: int) -> list:
    """``read``: the test pictures' ``read_pictures``."""
    rows = []
    t = time.perf_counter()
    q = embed(model, test)
    embed_s = (time.perf_counter() - t) / len(test)
    off = dict(refine=False, diversify=False, verify=False, neighbours=0, describe=False)
    variants = [
        (f"gallery retrieval alone (H3 res-{res} land gallery)", off),
        ("+ H3 refinement", {**off, "refine": True}),
        ("+ reference-image neighbours", {**off, "refine": True, "neighbours": 10}),
        (
            "+ diversify/verify (full pipeline)",
            {**off, "refine": True, "neighbours": 10, "diversify": True, "verify": True},
        ),
    ]
    for label, opts in variants:
        o = LocateOptions(top_k=1, **opts)
        t = time.perf_counter()
        res = locator.locate_embeddings(q, o, **read)
        per = embed_s + (time.perf_counter() - t) / len(test)
        pred = np.array([[r.candidates[0].lat, r.candidates[0].lon] for r in res])
        rows.append((label, pred, per))
    return rows


def print_table(name, rows, truth, test, refs, res: int, cells: int) -> None:
    print(
        f"\n{name}: held-out Blue Marble test: {len(test)} tiles (seed {TEST_SEED}); "
        f"{len(refs)} reference tiles; gallery H3 res {res}, {cells} cells"
    )
    head = (
        f"{'method':<48} {'25km':>7} {'200km':>7} {'750km':>7} {'2500km':>7} "
        f"{'median km':>10} {'GeoScore':>9} {'ms/img':>7}"
    )
    print(head)
    print("-" * len(head))
    for label, pred, per in rows:
        s = summarize_distances(errors_km(pred, truth))
        w = s.within
        print(
            f"{label:<48} {100 * w[25]:>6.1f}% {100 * w[200]:>6.1f}% {100 * w[750]:>6.1f}% "
            f"{100 * w[2500]:>6.1f}% {s.median_km:>10.1f} {s.mean_geoscore:>9.0f} "
            f"{per * 1000:>7.2f}"
        )


if __name__ == "__main__":
    main()
