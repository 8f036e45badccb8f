"""Synthetic pictures that are no view of the model's domain: the negatives of the
localizability verdict's outlier exposure (service/engine/localizability.py).

Every kind is drawn in code from a seeded random stream (numpy + PIL, nothing downloaded), at a
random size and aspect ratio, and most are JPEG-compressed at a random quality, so that the
verdict cannot learn a size or a codec. Natural photos are never used to fit or tune the
verdict: a separate check reports on them.

Which kinds apply depends on the profile's domain: a satellite profile gets all of them; a
ground-photo profile (``geoclip``) leaves out the kinds made to look like photos (``scene``,
``dead_leaves``), which would be its own domain.

Longer than most modules: a catalogue of small generators, one function per kind of picture.
"""

from __future__ import annotations

import io
import string
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from encoders.bluemarble import apply_palette

Rng = np.random.Generator

KINDS: tuple[str, ...] = (
    "white_noise",
    "pink_noise",
    "flat",
    "gradient",
    "text",
    "shapes",
    "pattern",
    "dead_leaves",
    "grass",
    "gravel",
    "brick",
    "scene",
    "blurred",
    "object",
    "micrograph",
)
#: Kinds drawn to look like photographs: negatives only for profiles that are not for photos.
PHOTO_LIKE: frozenset[str] = frozenset({"scene", "dead_leaves"})


def kinds_for(domain: str) -> tuple[str, ...]:
    """The negative kinds of a profile's domain ("satellite" or "photo")."""
    if domain == "satellite":
        return KINDS
    if domain == "photo":
        return tuple(k for k in KINDS if k not in PHOTO_LIKE)
    raise ValueError(f"unknown domain {domain!r}; expected 'satellite' or 'photo'")


# -- helpers ------------------------------------------------------------------------------------


def _size(rng: Rng) -> tuple[int, int]:
    """(width, height): short side 48..512 px (log-uniform), aspect ratio 1:2..2:1."""
    short = float(np.exp(rng.uniform(np.log(48), np.log(512))))
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    w, h = (short * aspect, short) if aspect >= 1 else (short, short / aspect)
    return max(8, round(w)), max(8, round(h))


def _colour(rng: Rng) -> np.ndarray:
    return rng.uniform(0, 1, 3)


def _rgb(c: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in np.clip(np.round(np.asarray(c) * 255), 0, 255))
    return r, g, b


def _image(x: np.ndarray) -> Image.Image:
    """(h, w, 3) or (h, w) floats in [0, 1] -> RGB image."""
    x = np.clip(np.asarray(x, np.float32), 0, 1)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    return Image.fromarray(np.round(x * 255).astype(np.uint8), "RGB")


def _grid(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates scaled to [0, 1] along the longer side."""
    s = max(w, h)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return x / s, y / s


def _normalise(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, [1, 99])
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)


def _fractal(rng: Rng, w: int, h: int, alpha: float) -> np.ndarray:
    """Noise whose power falls as 1/f^alpha, drawn at most 256 px and resized, in [0, 1]."""
    gw, gh = min(w, 256), min(h, 256)
    fy = np.fft.fftfreq(gh)[:, None]
    fx = np.fft.rfftfreq(gw)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    spec = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) * f ** (-alpha / 2)
    spec[0, 0] = 0
    x = _normalise(np.fft.irfft2(spec, s=(gh, gw)))
    if (gw, gh) != (w, h):
        x = (
            np.asarray(
                Image.fromarray((x * 255).astype(np.uint8)).resize(
                    (w, h), Image.Resampling.BILINEAR
                ),
                np.float32,
            )
            / 255.0
        )
    return x


def _palette(rng: Rng, y: np.ndarray, stops: np.ndarray | None = None) -> np.ndarray:
    """Map (h, w) values in [0, 1] through a piecewise-linear palette of random colours."""
    if stops is None:
        stops = rng.uniform(0, 1, (int(rng.integers(2, 5)), 3))
    return apply_palette(y, stops)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=max(6, size))
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


# -- the kinds ---------------------------------------------------------------------------------


def white_noise(rng: Rng) -> Image.Image:
    w, h = _size(rng)
    block = int(rng.choice([1, 1, 2, 4]))  # sometimes blocky noise
    bw, bh = max(1, w // block), max(1, h // block)
    c = 3 if rng.random() < 0.6 else 1
    mode = rng.choice(["gauss", "uniform", "salt"])
    if mode == "gauss":
        x = rng.uniform(0.2, 0.8, c) + rng.uniform(0.05, 0.4) * rng.standard_normal((bh, bw, c))
    elif mode == "uniform":
        x = rng.uniform(0, 1, (bh, bw, c))
    else:
        x = np.where(rng.random((bh, bw, 1)) < rng.uniform(0.05, 0.5), 1.0, 0.0) * np.ones(c)
        x = 0.5 * x + rng.uniform(0, 0.5, c)
    img = _image(np.broadcast_to(np.clip(x, 0, 1), (bh, bw, 3)))
    return img.resize((w, h), Image.Resampling.NEAREST)


def pink_noise(rng: Rng) -> Image.Image:
    w, h = _size(rng)
    alpha = float(rng.uniform(0.8, 3.0))
    style = rng.choice(["channels", "palette", "grey"])
    if style == "channels":
        x = np.stack([_fractal(rng, w, h, alpha) for _ in range(3)], axis=-1)
    elif style == "palette":
        x = _palette(rng, _fractal(rng, w, h, alpha))
    else:
        x = _fractal(rng, w, h, alpha)
    return _image(x)


def flat(rng: Rng) -> Image.Image:
    w, h = _size(rng)
    x = np.ones((h, w, 3), np.float32) * _colour(rng)
    x += rng.uniform(0, 0.02) * rng.standard_normal((h, w, 1))
    return _image(x)


def gradient(rng: Rng) -> Image.Image:
    w, h = _size(rng)
    gx, gy = _grid(w, h)
    if rng.random() < 0.5:
        a = rng.uniform(0, 2 * np.pi)
        t = gx * np.cos(a) + gy * np.sin(a)
    else:
        cx, cy = rng.uniform(0, 1, 2) * (w, h) / max(w, h)
        t = np.hypot(gx - cx, gy - cy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    x = _palette(rng, t, rng.uniform(0, 1, (int(rng.integers(2, 4)), 3)))
    return _image(x + rng.uniform(0, 0.01) * rng.standard_normal((h, w, 1)))


def _words(rng: Rng, n: int) -> str:
    letters = np.array(list(string.ascii_lowercase + string.ascii_lowercase[:10] + "eeaaoo"))
    return " ".join(
        "".join(rng.choice(letters, int(rng.integers(1, 11)))) for _ in range(max(1, n))
    )


def text(rng: Rng) -> Image.Image:
    """Lines of words on paper (scans, screenshots, documents); sometimes light on dark."""
    w, h = _size(rng)
    dark = rng.random() < 0.2
    paper = rng.uniform(0.05, 0.25, 3) if dark else rng.uniform(0.82, 1.0) - rng.uniform(0, 0.08, 3)
    x = np.ones((h, w, 3)) * paper + rng.uniform(0, 0.03) * rng.standard_normal((h, w, 1))
    img = _image(x)
    draw = ImageDraw.Draw(img)
    size = int(np.clip(rng.uniform(0.02, 0.09) * h, 7, 48))
    ink = rng.uniform(0.8, 1.0, 3) if dark else rng.uniform(0, 0.3, 3) * (rng.random(3) < 0.8)
    y = int(rng.uniform(0.02, 0.1) * h)
    margin = int(rng.uniform(0.02, 0.15) * w)
    spacing = rng.uniform(1.15, 1.9)
    while y < h:
        s = size * (2 if rng.random() < 0.1 else 1)  # a heading now and then
        n = int(max(1, (w - 2 * margin) / (s * 3.5)))
        draw.text((margin, y), _words(rng, n), fill=_rgb(ink), font=_font(s))
        y += int(s * spacing) + (s if rng.random() < 0.15 else 0)  # paragraph breaks
    return img


def shapes(rng: Rng) -> Image.Image:
    """Flat-shaded rectangles, ellipses, polygons and lines (clip art, logos, diagrams)."""
    w, h = _size(rng)
    bg = _colour(rng) if rng.random() < 0.5 else np.full(3, rng.uniform(0.85, 1.0))
    img = _image(np.ones((h, w, 3)) * bg)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 30))):
        x0, x1 = sorted(rng.uniform(-0.1, 1.1, 2) * w)
        y0, y1 = sorted(rng.uniform(-0.1, 1.1, 2) * h)
        fill = _rgb(_colour(rng))
        outline = _rgb(_colour(rng)) if rng.random() < 0.3 else None
        kind = rng.choice(["rect", "ellipse", "polygon", "line"])
        if kind == "rect":
            draw.rectangle((x0, y0, x1, y1), fill=fill, outline=outline)
        elif kind == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=fill, outline=outline)
        elif kind == "polygon":
            pts = rng.uniform(0, 1, (int(rng.integers(3, 8)), 2)) * (w, h)
            draw.polygon([tuple(p) for p in pts], fill=fill, outline=outline)
        else:
            width = int(rng.integers(1, max(2, min(w, h) // 15)))
            draw.line((x0, y0, x1, y1), fill=fill, width=width)
    return img


def pattern(rng: Rng) -> Image.Image:
    """Checkerboards, stripes, gratings and dot grids, possibly rotated."""
    w, h = _size(rng)
    gx, gy = _grid(w, h)
    a = rng.uniform(0, np.pi) if rng.random() < 0.5 else 0.0
    u = gx * np.cos(a) + gy * np.sin(a)
    v = -gx * np.sin(a) + gy * np.cos(a)
    period = float(np.exp(rng.uniform(np.log(3 / max(w, h)), np.log(0.3))))
    kind = rng.choice(["checker", "stripes", "grating", "dots"])
    if kind == "checker":
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif kind == "stripes":
        t = (np.floor(u / period) % 2).astype(np.float32)
    elif kind == "grating":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
    else:
        du, dv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
        t = (np.hypot(du, dv) < rng.uniform(0.15, 0.45)).astype(np.float32)
    c0, c1 = _colour(rng), _colour(rng)
    return _image(c0 + t[..., None] * (c1 - c0))


def _disc_radii(rng: Rng, n: int, rmin: float, rmax: float) -> np.ndarray:
    """Radii with density r^-3 on [rmin, rmax] (scale invariance of the dead-leaves model)."""
    u = rng.uniform(0, 1, n)
    return (rmin**-2 - u * (rmin**-2 - rmax**-2)) ** -0.5


def dead_leaves(rng: Rng) -> Image.Image:
    """The dead-leaves model: occluding discs with power-law radii, natural-image statistics."""
    w, h = _size(rng)
    rmin = max(1.0, 0.004 * max(w, h))
    rmax = rng.uniform(0.1, 0.4) * max(w, h)
    mean_area = 2 * np.pi * rmin**2 * np.log(rmax / rmin)
    n = int(min(8000, 3 * w * h / mean_area))
    grey = rng.random() < 0.3
    img = _image(np.ones((h, w, 3)) * _colour(rng))
    draw = ImageDraw.Draw(img)
    xs, ys = rng.uniform(0, w, n), rng.uniform(0, h, n)
    rs = _disc_radii(rng, n, rmin, rmax)
    cs = rng.uniform(0, 1, (n, 1 if grey else 3)) * np.ones(3)
    for x, y, r, c in zip(xs, ys, rs, cs, strict=True):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_rgb(c))
    return img


def _grass(rng: Rng, w: int, h: int) -> Image.Image:
    base = np.array([rng.uniform(0.05, 0.25), rng.uniform(0.15, 0.4), rng.uniform(0.0, 0.15)])
    img = _image(np.ones((h, w, 3)) * base)
    draw = ImageDraw.Draw(img)
    n = int(min(6000, w * h / rng.uniform(8, 30)))
    length = rng.uniform(0.03, 0.15) * h
    for _ in range(n):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        a = np.pi / 2 + rng.normal(0, 0.35)
        ln = length * rng.uniform(0.5, 1.5)
        g = rng.uniform(0.25, 0.75)
        c = (g * rng.uniform(0.3, 0.9), g, g * rng.uniform(0.0, 0.4))
        draw.line(
            (x, y, x + ln * np.cos(a), y - ln * np.sin(a)),
            fill=_rgb(np.array(c)),
            width=int(rng.integers(1, 3)),
        )
    return img


def grass(rng: Rng) -> Image.Image:
    w, h = _size(rng)
    return _grass(rng, w, h)


def _gravel(rng: Rng, w: int, h: int) -> Image.Image:
    tone = rng.uniform(0.3, 0.6)
    tint = rng.uniform(0.85, 1.15, 3)
    img = _image(np.ones((h, w, 3)) * tone * tint * 0.6)
    draw = ImageDraw.Draw(img)
    r_mean = rng.uniform(0.01, 0.04) * max(w, h)
    n = int(min(5000, 2.5 * w * h / (np.pi * r_mean**2)))
    for _ in range(n):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = r_mean * rng.uniform(0.5, 1.5, 2)
        c = np.clip(tone * tint * rng.uniform(0.6, 1.5) + rng.normal(0, 0.05, 3), 0, 1)
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=_rgb(c), outline=_rgb(c * 0.5))
    x = np.asarray(img, np.float32) / 255 + rng.uniform(0, 0.05) * rng.standard_normal((h, w, 1))
    return _image(x)


def gravel(rng: Rng) -> Image.Image:
    w, h = _size(rng)
    return _gravel(rng, w, h)


def brick(rng: Rng) -> Image.Image:
    w, h = _size(rng)
    mortar = np.full(3, rng.uniform(0.5, 0.85))
    img = _image(np.ones((h, w, 3)) * mortar)
    draw = ImageDraw.Draw(img)
    bw = rng.uniform(0.08, 0.3) * w
    bh = bw * rng.uniform(0.3, 0.5)
    gap = max(1.0, bh * rng.uniform(0.05, 0.2))
    base = np.array([rng.uniform(0.45, 0.75), rng.uniform(0.15, 0.35), rng.uniform(0.1, 0.25)])
    if rng.random() < 0.25:
        base = np.full(3, rng.uniform(0.3, 0.7))  # grey blocks
    for row, y in enumerate(np.arange(-bh, h + bh, bh + gap)):
        for x in np.arange(-bw * (0.5 * (row % 2) + 1), w + bw, bw + gap):
            c = np.clip(base * rng.uniform(0.75, 1.2) + rng.normal(0, 0.03, 3), 0, 1)
            draw.rectangle((x, y, x + bw, y + bh), fill=_rgb(c))
    x = np.asarray(img, np.float32) / 255 + rng.uniform(0.01, 0.06) * rng.standard_normal((h, w, 1))
    return _image(x)


def scene(rng: Rng) -> Image.Image:
    """A landscape: sky gradient above, textured ground below, silhouettes on the horizon."""
    w, h = _size(rng)
    horizon = int(rng.uniform(0.3, 0.7) * h)
    top = np.array([rng.uniform(0.05, 0.3), rng.uniform(0.2, 0.5), rng.uniform(0.5, 0.9)])
    low = (
        np.array([rng.uniform(0.8, 1), rng.uniform(0.5, 0.8), rng.uniform(0.3, 0.6)])
        if rng.random() < 0.2  # sunset
        else np.clip(top + rng.uniform(0.2, 0.5), 0, 1)
    )
    t = np.linspace(0, 1, max(horizon, 1))[:, None, None]
    sky = top + t * (low - top)
    img = _image(np.broadcast_to(sky, (max(horizon, 1), w, 3)))
    canvas = Image.new("RGB", (w, h))
    canvas.paste(img, (0, 0))
    gh = h - horizon
    ground_kind = rng.choice(["grass", "gravel", "fractal", "water"])
    if ground_kind == "grass":
        ground = _grass(rng, w, max(gh, 1))
    elif ground_kind == "gravel":
        ground = _gravel(rng, w, max(gh, 1))
    elif ground_kind == "fractal":
        stops = np.array([[0.2, 0.25, 0.1], [0.45, 0.4, 0.25], [0.3, 0.45, 0.2]])
        ground = _image(
            _palette(rng, _fractal(rng, w, max(gh, 1), 2.0), stops * rng.uniform(0.7, 1.3))
        )
    else:
        water = np.linspace(0.35, 0.15, max(gh, 1))[:, None, None] * np.array([0.6, 0.8, 1.4])
        ground = _image(np.broadcast_to(water, (max(gh, 1), w, 3)))
    canvas.paste(ground, (0, horizon))
    draw = ImageDraw.Draw(canvas)
    if rng.random() < 0.5:  # mountains
        xs = np.linspace(0, w, 12)
        ys = horizon - np.abs(np.cumsum(rng.normal(0, 0.06 * h, 12))) - rng.uniform(0, 0.1) * h
        c = _rgb(low * rng.uniform(0.4, 0.8))
        draw.polygon([(0, horizon), *zip(xs, ys, strict=True), (w, horizon)], fill=c)
    for _ in range(int(rng.integers(0, 8))):  # trees and buildings
        x = rng.uniform(0, w)
        size = rng.uniform(0.05, 0.3) * h
        dark = _rgb(rng.uniform(0, 0.25, 3))
        if rng.random() < 0.5:
            draw.rectangle(
                (x - size * 0.05, horizon - size * 0.4, x + size * 0.05, horizon), fill=dark
            )
            draw.ellipse(
                (x - size * 0.3, horizon - size, x + size * 0.3, horizon - size * 0.3), fill=dark
            )
        else:
            bw = size * rng.uniform(0.3, 1.0)
            draw.rectangle((x, horizon - size, x + bw, horizon), fill=dark)
            lit = _rgb(np.array([0.9, 0.85, 0.5]))
            step = max(3.0, size / 8)
            for wy in np.arange(horizon - size + step / 2, horizon - step, step):
                for wx in np.arange(x + step / 2, x + bw - step / 2, step):
                    if rng.random() < 0.4:
                        draw.rectangle((wx, wy, wx + step / 3, wy + step / 3), fill=lit)
    if rng.random() < 0.4:  # clouds
        for _ in range(int(rng.integers(1, 6))):
            cx, cy = rng.uniform(0, w), rng.uniform(0, horizon * 0.8)
            rx, ry = rng.uniform(0.05, 0.2) * w, rng.uniform(0.02, 0.06) * h
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=(245, 245, 245))
    return canvas


def _smooth_mask(inside: np.ndarray, soft: float) -> np.ndarray:
    """A 0/1 mask with edges blurred over ``soft`` px (a lens's, not a map's, edge)."""
    img = Image.fromarray((inside * 255).astype(np.uint8))
    if soft > 0:
        img = img.filter(ImageFilter.GaussianBlur(soft))
    return np.asarray(img, np.float32)[..., None] / 255.0


def _backdrop(rng: Rng, w: int, h: int) -> np.ndarray:
    """A studio backdrop: near black, near white or a pale neutral, a little uneven."""
    r = rng.random()
    if r < 0.45:
        base = np.full(3, rng.uniform(0.0, 0.035))
    elif r < 0.8:
        base = np.full(3, rng.uniform(0.9, 1.0))
    else:
        base = rng.uniform(0.5, 0.85) + rng.normal(0, 0.02, 3)
    gx, gy = _grid(w, h)
    a = rng.uniform(0, 2 * np.pi)
    shade = rng.uniform(0, 0.05) * (gx * np.cos(a) + gy * np.sin(a) - 0.5)
    return np.clip(base + shade[..., None], 0, 1)


def object_on_backdrop(rng: Rng) -> Image.Image:
    """One textured, shaded object on a plain backdrop (product shots, coins, planets and
    moons, dishes, eye fundus photographs): a disc, an ellipse or a lobed blob filling 30-95 %
    of the short side."""
    w, h = _size(rng)
    gx, gy = _grid(w, h)
    s = max(w, h)
    cx = (w / s) * rng.uniform(0.35, 0.65)
    cy = (h / s) * rng.uniform(0.35, 0.65)
    r0 = 0.5 * rng.uniform(0.3, 0.95) * min(w, h) / s
    dx, dy = gx - cx, gy - cy
    ang = np.arctan2(dy, dx)
    rr = np.hypot(dx, dy)
    shape = rng.choice(["disc", "ellipse", "blob"])
    if shape == "ellipse":
        t = rng.uniform(0, np.pi)
        e = rng.uniform(0.45, 0.9)
        u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
        rr = np.hypot(u, v / e)
    elif shape == "blob":
        for k in range(2, 6):  # a few smooth lobes
            rr = rr * (1 + rng.uniform(0, 0.12) * np.cos(k * ang + rng.uniform(0, 2 * np.pi)))
    inside = (rr <= r0).astype(np.float32)
    mask = _smooth_mask(inside, rng.uniform(0, 0.01) * s)
    tex = _fractal(rng, w, h, float(rng.uniform(1.5, 3.2)))
    fill = _palette(rng, tex) if rng.random() < 0.6 else np.repeat(tex[..., None], 3, -1)
    keep = rng.uniform(0.3, 1.0)  # the texture's share, the rest a tint
    fill = fill * keep + (1 - keep) * _colour(rng) * 0.5
    q = np.clip(rr / r0, 0, 1)
    if rng.random() < 0.7:  # shaded: a sphere's limb, or light from one side
        lx, ly = rng.normal(0, 0.5, 2)
        light = np.sqrt(1 - q**2) + 0.3 * (lx * dx + ly * dy) / r0
        fill = fill * np.clip(light, 0.05, 1.2)[..., None] ** rng.uniform(0.3, 1.0)
    draw_on = _image(np.clip(fill, 0, 1))
    draw = ImageDraw.Draw(draw_on)
    for _ in range(int(rng.integers(0, 25))):  # craters, spots, vessels, specks
        px, py = rng.uniform(-r0, r0, 2) * 0.8 + (cx, cy)
        pr = rng.uniform(0.01, 0.12) * r0 * s
        c = _rgb(np.clip(fill.mean((0, 1)) * rng.uniform(0.3, 1.6), 0, 1))
        if rng.random() < 0.5:
            draw.ellipse((px * s - pr, py * s - pr, px * s + pr, py * s + pr), outline=c)
        else:
            a = rng.uniform(0, 2 * np.pi)
            ln = rng.uniform(0.2, 0.9) * r0 * s
            draw.line(
                (px * s, py * s, px * s + ln * np.cos(a), py * s + ln * np.sin(a)),
                fill=c,
                width=int(rng.integers(1, 4)),
            )
    obj = np.asarray(draw_on, np.float32) / 255.0
    x = mask * obj + (1 - mask) * _backdrop(rng, w, h)
    return _image(x + rng.uniform(0, 0.01) * rng.standard_normal((h, w, 1)))


#: Stains of light microscopy as (background, cytoplasm, nucleus) colours: haematoxylin and
#: eosin, DAB with a blue counterstain, Giemsa, and unstained grey.
_STAINS = np.array(
    [
        [(0.95, 0.88, 0.92), (0.90, 0.55, 0.72), (0.35, 0.20, 0.55)],
        [(0.93, 0.92, 0.90), (0.62, 0.42, 0.25), (0.30, 0.35, 0.65)],
        [(0.92, 0.90, 0.95), (0.80, 0.60, 0.80), (0.45, 0.15, 0.50)],
        [(0.78, 0.78, 0.78), (0.60, 0.60, 0.60), (0.30, 0.30, 0.30)],
    ]
)


def micrograph(rng: Rng) -> Image.Image:
    """Cells under a microscope: many round cells of similar size, each with a nucleus, in a
    stain's colours on a light field, or fluorescent on black."""
    w, h = _size(rng)
    fluo = rng.random() < 0.3
    if fluo:
        back = np.full(3, rng.uniform(0, 0.05))
        glow = np.eye(3)[rng.integers(0, 3)] * 0.8 + rng.uniform(0, 0.2, 3)
        cyto, nucleus = glow * rng.uniform(0.3, 0.6), np.array([0.2, 0.3, 1.0]) * 0.9
    else:
        back, cyto, nucleus = _STAINS[rng.integers(0, len(_STAINS))] * rng.uniform(0.9, 1.05)
    r_cell = rng.uniform(0.02, 0.08) * min(w, h)
    density = rng.uniform(0.2, 1.2)
    n = int(min(3000, density * w * h / (np.pi * r_cell**2)))
    img = _image(np.ones((h, w, 3)) * back)
    draw = ImageDraw.Draw(img)
    for _ in range(n):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = r_cell * rng.uniform(0.7, 1.3, 2)
        c = np.clip(cyto * rng.uniform(0.8, 1.2), 0, 1)
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=_rgb(c), outline=_rgb(c * 0.7))
        nr = rng.uniform(0.25, 0.55)
        ox, oy = rng.normal(0, 0.15, 2) * (rx, ry)
        draw.ellipse(
            (x + ox - rx * nr, y + oy - ry * nr, x + ox + rx * nr, y + oy + ry * nr),
            fill=_rgb(np.clip(nucleus * rng.uniform(0.8, 1.2), 0, 1)),
        )
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.02 * min(w, h) + 0.5)))
    x = np.asarray(img, np.float32) / 255.0
    return _image(x + rng.uniform(0.005, 0.04) * rng.standard_normal((h, w, 1)))


_BASE: dict[str, Callable[[Rng], Image.Image]] = {
    "white_noise": white_noise,
    "pink_noise": pink_noise,
    "flat": flat,
    "gradient": gradient,
    "text": text,
    "shapes": shapes,
    "pattern": pattern,
    "dead_leaves": dead_leaves,
    "grass": grass,
    "gravel": gravel,
    "brick": brick,
    "scene": scene,
    "object": object_on_backdrop,
    "micrograph": micrograph,
}


def blurred(rng: Rng, kinds: tuple[str, ...] = tuple(_BASE)) -> Image.Image:
    """A heavy Gaussian blur (3-15 % of the short side) of another kind."""
    img = _BASE[str(rng.choice(kinds))](rng)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.03, 0.15) * min(img.size)))


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def generate(
    kind: str, rng: Rng, domain: str = "satellite", blur_from: tuple[str, ...] | None = None
) -> Image.Image:
    """One picture of ``kind``; 80 % of them JPEG-compressed at quality 20..95. ``blurred``
    blurs a picture of one of ``blur_from`` (default: every other kind of the domain)."""
    allowed = kinds_for(domain)
    if kind not in allowed:
        raise ValueError(f"unknown negative kind {kind!r} for domain {domain!r}; known: {allowed}")
    if kind == "blurred":
        sources = tuple(k for k in allowed if k != "blurred") if blur_from is None else blur_from
        if not sources or not set(sources) <= set(allowed) - {"blurred"}:
            raise ValueError(f"blur_from {blur_from!r}: name some of {allowed} but 'blurred'")
        img = blurred(rng, sources)
    else:
        img = _BASE[kind](rng)
    if rng.random() < 0.8:
        img = jpeg(img, int(rng.integers(20, 96)))
    return img


def negatives(
    kinds: tuple[str, ...],
    per_kind: int,
    seed: int,
    domain: str = "satellite",
    blur_from: tuple[str, ...] | None = None,
) -> Iterator[tuple[str, Image.Image]]:
    """``per_kind`` pictures of each kind, interleaved; the same ones for the same seed.
    ``blur_from``: the kinds ``blurred`` blurs (default: every other kind of the domain)."""
    streams = {k: np.random.default_rng([seed, i]) for i, k in enumerate(KINDS) if k in kinds}
    for _ in range(per_kind):
        for k in kinds:
            yield k, generate(k, streams[k], domain, blur_from)
