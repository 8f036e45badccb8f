"""Structure descriptors: where a picture is dark and where it is bright, coarsely.

The pipeline's verification compares a query with its reference neighbours by these as
well as by their embeddings, as landmark retrieval re-ranks its shortlist by a finer match.
A descriptor is the picture's luminance on a STRUCTURE_SIDE² grid, framed as the image tower
frames it (centre square), replaced by its ranks and normalised to zero mean and unit
length: the dot product of two descriptors is the rank (Spearman) correlation of their
layouts. Ranks make it blind to any brightening, contrast, haze or gamma that keeps the
order of luminance, and luminance makes it blind to hue; the embedding carries the rest.

Stored as int8 (x 127), one row per reference image; all zeros means "unknown" (a reference
added before descriptors existed) and matches nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

STRUCTURE_SIDE = 16
STRUCTURE_DIM = STRUCTURE_SIDE * STRUCTURE_SIDE
_SCALE = 127.0


def structure_descriptors(images: Sequence[Image.Image]) -> np.ndarray:
    """(n, STRUCTURE_DIM) int8 descriptors of the pictures."""
    out = np.zeros((len(images), STRUCTURE_DIM), dtype=np.int8)
    for i, img in enumerate(images):
        w, h = img.size
        side = min(w, h)
        if side < 1:
            continue
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
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
    return out


def structure_similarity(query: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Correlation in [-1, 1] of one descriptor (D,) with each of refs (k, D)."""
    q = np.asarray(query, dtype=np.float32)
    return np.asarray(refs, dtype=np.float32) @ q / (_SCALE * _SCALE)
