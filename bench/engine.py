"""Engine benchmark: GeoCLIP's predict() vs the geoloc pipeline, and gallery builds.

Random backbone weights (the compute is the same as with real ones), real GeoCLIP
head / GPS-tower / logit-scale weights from the `geoclip` package. All timings in
one run, compared as ratios.

    .venv/bin/python bench/engine.py [--runs 3] [--skip-res5]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders import load_model
from encoders.profiles import geoclip_weight_files
from index.gallery import csv_gallery, encode_gallery, h3_gallery
from index.geocode import ReverseGeocoder
from index.store import PointTable, load_index, publish_index
from service.engine.locator import Locator
from service.engine.options import LocateOptions


def timed(fn, runs: int) -> tuple[float, object]:
    out = fn()  # warm-up (allocations, lazy inits)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-res5", action="store_true")
    ap.add_argument("--skip-geoclip", action="store_true")
    ap.add_argument("--skip-galleries", action="store_true")
    ap.add_argument("--sample", type=int, default=50_000, help="res-5 points to encode")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="geoloc-bench-"))
    img_path = tmp / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8)).save(
        img_path
    )
    image = Image.open(img_path).convert("RGB")

    rows: list[tuple[str, str]] = []

    # (a) GeoCLIP's own predict(): re-encodes the 100K gallery on every call.
    geoclip_s = float("nan")
    if not args.skip_geoclip:
        import geoclip

        ref = geoclip.GeoCLIP(from_pretrained=False, clip_pretrained=False)
        ref.weights_folder = str(geoclip_weight_files()["head"].parent)
        ref._load_weights()
        ref.eval()
        geoclip_s, _ = timed(lambda: ref.predict(str(img_path), top_k=5), max(1, args.runs - 1))
        rows.append(("geoclip predict() per image", f"{geoclip_s * 1000:.0f} ms"))
        del ref

    # (b) ours: ViT-L-14 (random weights) + GeoCLIP heads, 100K gallery index built once.
    model = load_model("geoclip", random_backbone=True)
    gallery = csv_gallery(geoclip_weight_files()["gallery"])
    t = time.perf_counter()
    vectors = encode_gallery(gallery, model.embed_gps, 512, progress=False)
    build_100k = time.perf_counter() - t
    geocoder = ReverseGeocoder()
    points = PointTable(
        ids=gallery.ids, latlon=gallery.latlon, country=geocoder.country_codes(gallery.latlon)
    )
    publish_index(
        tmp, "g100k", vectors, points, profile="geoclip", gallery_kind="csv", h3_resolution=None
    )
    loc = Locator(model, load_index(tmp, "g100k"), geocoder)
    full = LocateOptions()
    ours_s, res = timed(lambda: loc.locate([image], full)[0], args.runs)
    backbone_s, _ = timed(lambda: loc.embed([image]), args.runs)
    q = loc.embed([image])
    outside_s, _ = timed(lambda: loc.locate_embeddings(q, full), args.runs * 3)
    batch = [image] * 8
    batch_s, _ = timed(lambda: loc.locate(batch, full), 1)
    rows += [
        ("geoloc locate() per image, all stages", f"{ours_s * 1000:.0f} ms"),
        ("geoloc locate(), batch of 8, per image", f"{batch_s / 8 * 1000:.0f} ms"),
        ("  image backbone + head alone", f"{backbone_s * 1000:.0f} ms"),
        ("  everything outside the backbone", f"{outside_s * 1000:.1f} ms"),
        ("  per stage (ms)", ", ".join(f"{k} {v:.1f}" for k, v in res.timings_ms.items())),
        ("speed-up vs geoclip predict()", f"{geoclip_s / ours_s:.1f}x"),
        ("outside-backbone share of backbone time", f"{100 * outside_s / backbone_s:.1f}%"),
        ("100K GeoCLIP gallery encode", f"{len(gallery.ids) / build_100k:.0f} points/s"),
    ]

    # Gallery builds: land-only H3 galleries at res 4 and 5. Res 5 (~600K cells) is
    # encoded on a sample of --sample points; the rate is per point, and a Flat index
    # stores the same bytes per point at any size, so its size follows from the count.
    for res in () if args.skip_galleries else (4,) if args.skip_res5 else (4, 5):
        t = time.perf_counter()
        g = h3_gallery(res, land_only=True)
        t_cells = time.perf_counter() - t
        n_enc = len(g.ids) if res == 4 else min(args.sample, len(g.ids))
        t = time.perf_counter()
        part = dataclasses.replace(g, ids=g.ids[:n_enc], latlon=g.latlon[:n_enc])
        vec = encode_gallery(part, model.embed_gps, 512, progress=False)
        t_enc = time.perf_counter() - t
        rate = n_enc / t_enc
        if res == 4:
            pts = PointTable(ids=g.ids, latlon=g.latlon, country=geocoder.country_codes(g.latlon))
            m = publish_index(
                tmp, f"res{res}", vec, pts, profile="geoclip", gallery_kind="h3", h3_resolution=res
            )
            size = dir_bytes(tmp / "indexes" / f"res{res}" / m.version)
            per_point = size / len(g.ids)
            how = "measured"
        else:
            size = per_point * len(g.ids)
            how = "from bytes/point"
        rows.append(
            (
                f"res-{res} land gallery",
                f"{len(g.ids)} cells ({t_cells:.1f} s), "
                f"encode {rate:.0f} points/s ({len(g.ids) / rate:.0f} s in all), "
                f"index {size / 2**20:.0f} MiB ({how})",
            )
        )
        del vec

    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
