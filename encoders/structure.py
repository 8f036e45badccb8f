"""Structure descriptors: where a picture is dark and where it is bright, coarsely.

The pipeline's verification compares a query with its reference neighbours by these as
well as by their embeddings, as landmark retrieval re-ranks its shortlist by a finer match.
A descriptor is the picture's luminance on a STRUCTURE_SIDE² grid, framed as the image tower
frames it (centre square), replaced by its ranks and normalised to zero mean and unit
length: the dot product of two descriptors is the rank (Spearman) correlation of their
layouts. Ranks make it blind to any brightening, contrast, haze or gamma that keeps the
order of luminance, and luminance makes it blind to hue; the embedding carries the rest.

A false-colour picture to be located (a quantity drawn through a colour ramp: a height or
vegetation map) is laid out by its position along the ramp instead (``follow_ramps``). Its
colours then lie along one curve in colour space, and a ramp's luminance need not follow the
quantity it draws (a height ramp may go blue, green, bright yellow, dark brown, white), while
the order along the curve does. The curve is the longest path of the minimum spanning tree
over the picture's distinct colours, laid out from dark to bright overall. A ramp whose
luminance rises and falls has no dark end, so where the position follows luminance less than
RAMP_SURE its direction is unsure, and the locator turns it round if the reversed layout
matches a reference better (``picture_descriptors`` says which pictures are unsure). The same
reading gives the image tower a grey view of such a picture (``ramp_view``): the model learned
grey pictures, not the ramp's colours, and the locator keeps whichever answer is surer. Any
picture whose colours do not lie on one curve (photographs, satellite views in true colour,
drawings of a few flat colours) keeps luminance, and so does a picture whose colours a codec
flattened (``COLOURS_FLATTENED``: a heavily compressed JPEG's few chroma levels can fall on one
curve; read as ramps, such pictures lost 0.3-0.5 points within 200 to 2,500 km on validation
draws, docs/BENCHMARKS.md). Reference images keep luminance always: they
are views in true colour, whose luminance is what a ramp's order estimates, and their stored
descriptors stay valid (reading references as ramps too cost true-colour pictures up to a
point within 200 km on validation draws: docs/BENCHMARKS.md).

Stored as int8 (x 127), one row per reference image; all zeros means "unknown" (a reference
added before descriptors existed) and matches nothing.

Colour thumbnails are the other half of the comparison: the picture's centre square in RGB on
a COLOUR_SIDE² grid (uint8). The layout is blind to hue and the embedding is trained to ignore
it, so two views of one region with the same layout but other colours (a narrow view whose
layout matches many places) were told apart by nothing. ``colour_agreement`` credits only a
close match, so a picture whose colours were shifted (a palette, a gamma, haze) gets nothing
from them rather than a wrong match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy.sparse.csgraph import minimum_spanning_tree, shortest_path
from scipy.spatial import cKDTree
from scipy.spatial.distance import pdist, squareform

#: Key of ``Image.info`` that marks a picture whose colours a codec flattened (a heavily
#: compressed JPEG keeps a few chroma levels per 16 x 16 block, so a true-colour view's colours
#: may fall on one curve): such a picture is never read as a colour ramp. The decoder that
#: judges the compression sets it (service.engine.images).
COLOURS_FLATTENED = "geoloc.colours_flattened"
STRUCTURE_SIDE = 16
STRUCTURE_DIM = STRUCTURE_SIDE * STRUCTURE_SIDE
_SCALE = 127.0
#: Colour thumbnails: COLOUR_SIDE² RGB cells of the centre square (8: as good as 16 on
#: validation draws, docs/BENCHMARKS.md), uint8, row-major cells, channels last.
COLOUR_SIDE = 8
COLOUR_DIM = COLOUR_SIDE * COLOUR_SIDE * 3
#: Colour ramps: the picture's colours are examined on a RAMP_SIDE² sample of its centre square,
#: each channel in RAMP_LEVELS steps. A ramp shows at least RAMP_MIN_COLOURS distinct colours
#: (fewer: flat areas, a drawing) and at most RAMP_DENSITY of them per step of the box they
#: span (the sum of its three sides): a curve visits each step about once, a photograph's
#: colour cloud fills an area (and is not examined further). At most RAMP_FAR_SHARE of its
#: pixels lie more than RAMP_FAR_STEPS steps off the curve (a ramp quantised to steps is a
#: staircase, a step or two wide). Chosen on validation draws (bench/tune.py --ramps): seven
#: matplotlib ramps are read as ramps in 99.7-100 % of tiles; true-colour tiles in 0.0-3.0 %,
#: where their colours happen to lie along one curve (with 32 steps a channel, up to 6.3 % at
#: 0.5 % of the pixels off the curve, up to 11 % at 2 %).
#: Where a ramp's curve turns sharply (an atlas's tints: green, pale yellow, tan), its two arms
#: come within a step of each other near the bend, the tree cuts across them and the bend's tip
#: hangs off the longest path. Colours further off the curve are still a ramp's when they hang
#: at no more than RAMP_TIPS places, at most RAMP_TIP_STEPS steps off and RAMP_TIP_COLOURS
#: colours each, off a curve at least RAMP_TIP_LENGTH steps long (a tip is narrow and the
#: curve long beside it; a photograph's cloud branches everywhere, and a dull picture's few
#: colours make a short curve that a few steps off it would bend anywhere). They lie where
#: they hang.
RAMP_TIPS = 2
RAMP_TIP_STEPS = 4.0
RAMP_TIP_COLOURS = 8
RAMP_TIP_LENGTH = 40.0
RAMP_SIDE = 64
RAMP_LEVELS = 64
RAMP_MIN_COLOURS = 12
RAMP_DENSITY = 2.0
RAMP_FAR_STEPS = 1.75
RAMP_FAR_SHARE = 0.005
#: A ramp whose position correlates with luminance at least this much over the pixels runs
#: surely dark to bright (rising ramps: 0.95 and more for 95 % of validation pictures); below
#: it, luminance rises and falls along the ramp and the direction is unsure.
RAMP_SURE = 0.9
#: A grey view of a ramp of unsure direction is drawn at most this many pixels a side (a
#: larger picture is first shrunk, nearest colour: the image tower shrinks it anyway).
RAMP_VIEW_SIDE = 1024
_LUMA = np.array([0.299, 0.587, 0.114])


class Ramp(NamedTuple):
    """A picture's colour ramp: its colours (quantised codes, sorted), each one's position
    along the curve in [0, 1] from the dark end, and whether that direction is sure."""

    codes: np.ndarray
    along: np.ndarray
    sure: bool


class PictureReading(NamedTuple):
    """What ``picture_descriptors`` read: the (n, STRUCTURE_DIM) int8 descriptors, which of
    them (n,) bool are ramps of unsure direction, each picture's ramp (None: none) and the
    (n, COLOUR_DIM) uint8 colour thumbnails."""

    descriptors: np.ndarray
    unsure: np.ndarray
    ramps: list[Ramp | None]
    colour: np.ndarray | None = None  # references' descriptors are read without


def structure_descriptors(
    images: Sequence[Image.Image], *, follow_ramps: bool = False
) -> np.ndarray:
    """(n, STRUCTURE_DIM) int8 descriptors of the pictures; with ``follow_ramps`` (pictures to
    locate, not references), a false-colour picture's along its colour ramp."""
    return _describe(images, follow_ramps).descriptors


def picture_descriptors(images: Sequence[Image.Image]) -> PictureReading:
    """Descriptors of pictures to locate (along their colour ramps where they are read as
    ramps), which of them are ramps whose direction is unsure (the caller's to choose), the
    ramps (for ``ramp_view``) and the colour thumbnails."""
    return _describe(images, True)._replace(colour=colour_thumbnails(images))


def colour_thumbnails(images: Sequence[Image.Image]) -> np.ndarray:
    """(n, COLOUR_DIM) uint8: each picture's centre square in RGB on a COLOUR_SIDE² grid (all
    zeros for an empty picture)."""
    out = np.zeros((len(images), COLOUR_DIM), dtype=np.uint8)
    for i, img in enumerate(images):
        box = _centre_square(img)
        if box is None:
            continue
        # Resized first where the mode allows, converted after: a large picture is not
        # copied whole.
        src = img if img.mode in ("RGB", "RGBA", "L") else img.convert("RGB")
        small = src.resize(
            (COLOUR_SIDE, COLOUR_SIDE), Image.Resampling.BOX, box=box, reducing_gap=2.0
        )
        out[i] = np.asarray(small.convert("RGB"), dtype=np.uint8).ravel()
    return out


def colour_agreement(picture: np.ndarray, refs: np.ndarray, threshold: float) -> np.ndarray:
    """(k,) in [0, 1]: how closely each reference thumbnail of refs (k, COLOUR_DIM) matches
    the picture's (COLOUR_DIM,). The match is c = 1 − ‖p − r‖² / ‖p − p̄‖², where p̄ is the
    picture's mean over all its cells and channels: the share of the picture's departure from
    a flat grey of its brightness (its hue and its contrast both) that the reference explains.
    1 for the same colours, 0 for no better than that grey. Only a close match counts:
    (c − threshold) / (1 − threshold), clipped to [0, 1]. A flat grey picture gets 0, and
    unknown (all-zero) references nan."""
    p = np.asarray(picture, dtype=np.float64).ravel()
    r = np.asarray(refs, dtype=np.float64).reshape(len(refs), len(p))
    spread = float(((p - p.mean()) ** 2).sum())
    known = r.any(axis=1)
    if spread < 1.0 or not len(r):  # under one grey level in all: no colours to compare
        return np.where(known, 0.0, np.nan)
    c = 1.0 - ((r - p) ** 2).sum(axis=1) / spread
    return np.where(known, np.clip((c - threshold) / (1.0 - threshold), 0.0, 1.0), np.nan)


def ramp_view(img: Image.Image, ramp: Ramp, turned: bool = False) -> Image.Image:
    """The picture in grey along its colour ramp, for the image tower: a ramp that runs surely
    dark to bright keeps its own luminance (the grey picture the quantity would give); one of
    unsure direction is drawn by its position along the ramp, from the end ``turned`` says
    (the locator's choice) to the other. The picture's size (at most RAMP_VIEW_SIDE)."""
    if ramp.sure:
        return img.convert("L").convert("RGB")
    if max(img.size) > RAMP_VIEW_SIDE:
        img = img.copy()
        img.thumbnail((RAMP_VIEW_SIDE, RAMP_VIEW_SIDE), Image.Resampling.NEAREST)
    code = _codes(np.asarray(img.convert("RGB")))
    row = np.minimum(np.searchsorted(ramp.codes, code), len(ramp.codes) - 1)
    known = ramp.codes[row] == code
    if not known.all():  # colours the sample missed: the nearest colour of the ramp
        _, nearest = cKDTree(_levels(ramp.codes)).query(_levels(code[~known]))
        row[~known] = nearest
    position = ramp.along[row]
    grey = np.round(255.0 * (1.0 - position if turned else position))
    return Image.fromarray(grey.astype(np.uint8)).convert("RGB")


def _codes(rgb: np.ndarray) -> np.ndarray:
    """Each pixel's colour, each channel in RAMP_LEVELS steps, as one integer code."""
    q = rgb.astype(np.int32) * RAMP_LEVELS // 256
    return (q[..., 0] * RAMP_LEVELS + q[..., 1]) * RAMP_LEVELS + q[..., 2]


def _levels(codes: np.ndarray) -> np.ndarray:
    """Codes as (n, 3) float steps per channel."""
    return np.stack(
        [codes // RAMP_LEVELS**2, codes // RAMP_LEVELS % RAMP_LEVELS, codes % RAMP_LEVELS],
        axis=1,
    ).astype(np.float64)


def _describe(images: Sequence[Image.Image], follow_ramps: bool) -> PictureReading:
    out = np.zeros((len(images), STRUCTURE_DIM), dtype=np.int8)
    unsure = np.zeros(len(images), dtype=bool)
    ramps: list[Ramp | None] = [None] * len(images)
    for i, img in enumerate(images):
        box = _centre_square(img)
        if box is None:
            continue
        readable = follow_ramps and img.info.get(COLOURS_FLATTENED) is not True
        read = _ramp_grid(img, box) if readable else None
        grid = None if read is None else read[0]
        if read is not None:
            ramps[i] = read[1]
            unsure[i] = not read[1].sure
        if grid is None:
            # reducing_gap: a large picture is first shrunk by an integer factor, which is cheap.
            grid = img.convert("L").resize(
                (STRUCTURE_SIDE, STRUCTURE_SIDE), Image.Resampling.BOX, box=box, reducing_gap=2.0
            )
        y = np.asarray(grid, dtype=np.uint8).ravel()
        counts = np.bincount(y, minlength=256)
        # Tied pixels share their mean rank: a flat patch has no order to compare.
        r = (np.cumsum(counts) - (counts + 1) / 2.0)[y].astype(np.float32)
        r -= r.mean()
        if not r.any():  # flat: no layout at all
            continue
        out[i] = np.round(r * (_SCALE / np.linalg.norm(r)))
    return PictureReading(out, unsure, ramps)


def _centre_square(img: Image.Image) -> tuple[int, int, int, int] | None:
    """The picture's centre square as a crop box, as the image tower frames it (None: empty)."""
    w, h = img.size
    side = min(w, h)
    if side < 1:
        return None
    return ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)


def _ramp_grid(img: Image.Image, box: tuple[int, int, int, int]) -> tuple[np.ndarray, Ramp] | None:
    """The STRUCTURE_SIDE² grid (uint8) of the picture's position along its colour ramp and
    the ramp, or None when its colours do not lie along one curve."""
    if box[2] - box[0] < RAMP_SIDE or img.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
        return None
    # Nearest, not averaged: averaging blends two colours of the ramp into one off it.
    # Resized first, converted after: a large picture is not copied whole.
    rgb = np.asarray(
        img.resize((RAMP_SIDE, RAMP_SIDE), Image.Resampling.NEAREST, box=box).convert("RGB")
    )
    found = _ramp(rgb)
    if found is None:
        return None
    position, ramp = found
    cell = RAMP_SIDE // STRUCTURE_SIDE
    grid = position.reshape(STRUCTURE_SIDE, cell, STRUCTURE_SIDE, cell).mean(axis=(1, 3))
    return np.round(grid * (255.0 / max(float(grid.max()), 1e-9))), ramp


def ramp_position(rgb: np.ndarray) -> np.ndarray | None:
    """Each pixel's position (h, w) float in [0, 1] along the curve its colours lie on, from
    dark to bright, or None when the colours (h, w, 3) uint8 do not lie along one curve."""
    found = _ramp(rgb)
    return None if found is None else found[0]


def _ramp(rgb: np.ndarray) -> tuple[np.ndarray, Ramp] | None:
    """``ramp_position`` and the ramp; its direction is sure where the position follows
    luminance (their correlation over the pixels) at least RAMP_SURE."""
    colours, where, counts = np.unique(_codes(rgb).ravel(), return_inverse=True, return_counts=True)
    if len(colours) < RAMP_MIN_COLOURS:
        return None
    levels = _levels(colours)
    if len(colours) > RAMP_DENSITY * (np.ptp(levels, axis=0).sum() + 1):
        return None
    if np.ptp(levels, axis=1).max() <= 1:  # grey: luminance is that order already
        return None
    tree = minimum_spanning_tree(squareform(pdist(levels)))
    # The tree's longest path: the farthest colour from any colour is one end, the farthest
    # from that end the other. Each colour's position is its projection on that path, and its
    # distance from the path says how far off the curve it lies.
    end = int(np.argmax(shortest_path(tree, directed=False, indices=0)))
    from_a = shortest_path(tree, directed=False, indices=end)
    from_b = shortest_path(tree, directed=False, indices=int(np.argmax(from_a)))
    length = float(from_a.max())
    off = (from_a + from_b - length) / 2.0
    along = (from_a - from_b + length) / (2.0 * length)
    far = off > RAMP_FAR_STEPS
    if counts @ far > RAMP_FAR_SHARE * counts.sum() and not _bend_tips(
        along[far] * length, off[far], length
    ):
        return None
    position = along[where].reshape(rgb.shape[:2])
    luma = rgb.astype(np.float64) @ _LUMA
    agreement = float(np.corrcoef(position.ravel(), luma.ravel())[0, 1]) if luma.std() else 0.0
    if agreement < 0:
        along, position, agreement = 1.0 - along, 1.0 - position, -agreement
    return position, Ramp(colours, along, agreement >= RAMP_SURE)


def _bend_tips(hung_at: np.ndarray, off: np.ndarray, length: float) -> bool:
    """Whether the colours far off a curve ``length`` steps long are the tips of its sharp
    bends: ``hung_at``, where each hangs (steps along the curve; a branch's colours project
    onto the place where it leaves it), and ``off``, how far off it each lies (steps)."""
    _, per_place = np.unique(np.round(hung_at, 3), return_counts=True)
    return (
        length >= RAMP_TIP_LENGTH
        and len(per_place) <= RAMP_TIPS
        and float(off.max()) <= RAMP_TIP_STEPS + 1e-9
        and int(per_place.max()) <= RAMP_TIP_COLOURS
    )


def structure_similarity(query: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Correlation in [-1, 1] of one descriptor (D,) with each of refs (k, D)."""
    q = np.asarray(query, dtype=np.float32)
    return np.asarray(refs, dtype=np.float32) @ q / (_SCALE * _SCALE)
