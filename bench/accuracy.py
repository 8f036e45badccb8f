"""What each pipeline stage adds, on the held-out Blue Marble test (bundled model).

Rows: a pixel-space nearest-neighbour baseline over the reference tiles, gallery
retrieval alone (GeoCLIP-style, fixed H3 land gallery), + H3 refinement,
+ reference-image neighbours, + diversify/verify (the full pipeline). Top-1 error.

    .venv/bin/python bench/accuracy.py [--test 2000] [--refs 300000] [--res 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders import load_model
from index.geocode import ReverseGeocoder
from index.store import load_index
from service.datasets import read_labelled_csv
from service.engine import GallerySpec, add_reference_images, build_index
from service.evaluation import errors_km, summarize_distances
from service.pipeline import LocateOptions, Locator
from service.settings import Settings
from service.training import write_bluemarble_set

OUT = Path(__file__).resolve().parent / "out"
TEST_SEED, REF_SEED = 12345, 777  # training uses seeds derived from 0 (see docs/TRAINING.md)


def tileset(kind: str, n: int, seed: int) -> list:
    d = OUT / f"bm-{kind}-{n}-{seed}"
    if not (d / "labels.csv").is_file():
        write_bluemarble_set(d, n, seed=seed, kind=kind)
    rows, problems = read_labelled_csv(d / "labels.csv")
    assert not problems, problems[:3]
    return rows


def pixels(rows: list, side: int = 16) -> np.ndarray:
    """Tiles as small normalised pixel vectors (the baseline's feature)."""
    out = np.empty((len(rows), side * side * 3), np.float32)
    for i, r in enumerate(rows):
        a = np.asarray(Image.open(r.path).convert("RGB").resize((side, side)), np.float32)
        out[i] = a.reshape(-1) / 255.0
    return out


def embed(model, rows: list, batch: int = 256) -> np.ndarray:
    chunks = []
    for s in range(0, len(rows), batch):
        chunks.append(model.embed_images([Image.open(r.path) for r in rows[s : s + batch]]))
    return np.concatenate(chunks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--refs", type=int, default=300000)
    ap.add_argument("--res", type=int, default=4)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus")
    test = tileset("test", args.test, TEST_SEED)
    refs = tileset("reference", args.refs, REF_SEED)
    truth = np.array([[r.lat, r.lon] for r in test])

    settings = Settings(data_dir=OUT / f"data-res{args.res}-{args.refs}")
    model = load_model("bluemarble")
    if not (settings.data_dir / "indexes" / "gallery").is_dir():
        build_index(settings, "gallery", GallerySpec(kind="h3", res=args.res), model=model)
    if not (settings.data_dir / "indexes" / "refs").is_dir():
        add_reference_images(
            settings,
            refs[0].path.parent / "labels.csv",
            model=model,
            name="refs",
            runner="inprocess",
        )
    locator = Locator(
        model,
        load_index(settings.data_dir, "gallery"),
        ReverseGeocoder(),
        neighbours=load_index(settings.data_dir, "refs"),
    )

    rows: list[tuple[str, np.ndarray, float]] = []
    t = time.perf_counter()
    ref_px, test_px = pixels(refs), pixels(test)
    ref_ll = np.array([[r.lat, r.lon] for r in refs])
    nn = np.empty(len(test), np.int64)
    ref_sq = (ref_px**2).sum(1)
    for s in range(0, len(test), 256):
        d = ref_sq[None, :] - 2 * test_px[s : s + 256] @ ref_px.T
        nn[s : s + 256] = d.argmin(1)
    rows.append(
        (
            "pixel nearest neighbour (reference tiles)",
            ref_ll[nn],
            (time.perf_counter() - t) / len(test),
        )
    )

    t = time.perf_counter()
    q = embed(model, test)
    embed_s = (time.perf_counter() - t) / len(test)
    off = dict(refine=False, diversify=False, verify=False, neighbours=0, describe=False)
    variants = [
        (f"gallery retrieval alone (H3 res-{args.res} land gallery)", off),
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
        res = locator.locate_embeddings(q, o)
        per = embed_s + (time.perf_counter() - t) / len(test)
        pred = np.array([[r.candidates[0].lat, r.candidates[0].lon] for r in res])
        rows.append((label, pred, per))

    print(
        f"\nheld-out Blue Marble test: {len(test)} tiles (seed {TEST_SEED}); "
        f"{len(refs)} reference tiles; gallery H3 res {args.res}, {len(locator.index)} cells"
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
