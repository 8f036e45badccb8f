"""Localizability: can this picture be located by this model at all?

A retrieval model always answers, also for a cat, a scanned page or noise, and its answer
then looks as confident as any other. The verdict judges each picture with a small classifier
over cheap features:

- **image statistics** of the picture as the model frames it (short side resized to
  ``SIDE`` px, centre crop): colour, saturation, gradients, flat and clipped pixels,
  high-frequency energy and spectral slope, luma entropy, strong axis-aligned edges (text,
  buildings), a bright or blue top (sky), colour count, how much the picture changes across
  its area, how plain its border is and how far its middle is from the border (one thing on
  a backdrop);
- **answer shape** from the pipeline: the best gallery cosine, the entropy and top-1/top-2
  gap of the softmax over the best ``GALLERY_K`` gallery points, the mean cosine to the
  ``NEIGHBOURS_K`` nearest reference images and the best layout match among the reference
  images found by their structure (encoders/structure.py), when there is a reference index:
  a view of the Earth has a place whose layout of light and dark is its own, a texture, a
  page or a photo of a room rarely has one.

The classifier (standardised features -> one hidden tanh layer -> logistic) is trained with
outlier exposure: positives are held-out pictures of the model's domain, negatives are
synthetic pictures of other kinds (service/engine/negatives.py), never natural photos. It is
cross-fitted: one classifier per fold, trained on the other folds, the score their mean. Two
thresholds fitted on the out-of-fold scores make the verdict: ``not_locatable`` below ``t_low``
(about 2 % of in-domain pictures fall there), ``located`` from ``t_high`` (at most about 1 % of
negatives reach it, and the least typical tenth of in-domain pictures stays below it),
``uncertain`` between: pictures that look like the domain, but less so than most it knows. The
fitted model is plain arrays in JSON, stored in the calibration artifact
(service/engine/calibration.py) beside the index version.

No HTTP and no database here; torch is used only to fit.

Longer than most modules: the verdict's features, its classifier, its fit and its reasons
change together (a feature added here is fitted, versioned and explained here).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image

#: Version of the features and of the stored model's layout (3: the best layout match is
#: measured with pictures in false colour laid out along their colour ramps; 4: ramps that
#: turn sharply read with the tips of their bends; 5: how plain the picture's border is and
#: how its middle differs from it, a thing on a backdrop; 6: a cross-fitted classifier per
#: fold). Pictures whose colours a codec
#: flattened were laid out by luminance under format 4 without a new format, as few of a
#: verdict's fit tiles (JPEG quality 35 and above) are smoothed on decoding (8 %), and of those
#: only the few whose colours fell on one curve were read as ramps.
FORMAT = 6
#: Side of the square the image statistics are measured on.
SIDE = 64
#: Gallery points whose softmax gives the answer-shape features; reference neighbours averaged.
GALLERY_K = 32
NEIGHBOURS_K = 10
VERDICTS = ("located", "uncertain", "not_locatable")
#: Share of validation in-domain pictures below t_low, and of validation negatives allowed
#: to reach t_high.
IN_DOMAIN_BELOW_LOW = 0.02
NEGATIVES_ABOVE_HIGH = 0.01
#: Share of validation in-domain pictures below t_high at least: when the classes separate
#: cleanly, the least typical of the domain's own pictures (odd zoom, colours, sensor) are
#: said to be uncertain rather than located.
IN_DOMAIN_BELOW_HIGH = 0.10
#: Standardised features are clipped to this many standard deviations: a picture far outside
#: everything seen in the fit must not drive the tanh layer into an arbitrary corner.
CLIP_Z = 8.0

IMAGE_FEATURES: tuple[str, ...] = (
    "mean_r",
    "mean_g",
    "mean_b",
    "std_r",
    "std_g",
    "std_b",
    "sat_mean",
    "sat_std",
    "grad_mean",
    "grad_std",
    "grad_p90",
    "grad_kurtosis",
    "flat_share",
    "hf_ratio",
    "spectral_slope",
    "luma_entropy",
    "clipped_share",
    "strong_edge_share",
    "hv_edge_share",
    "sky_luma",
    "sky_blue",
    "colour_count",
    "block_mean_std",
    "block_std_std",
    "frame_std",
    "frame_gap",
)
ANSWER_FEATURES: tuple[str, ...] = (
    "best_gallery_cos",
    "gallery_spread",
    "softmax_entropy",
    "softmax_gap",
    "ref_mean_cos",
    "has_refs",
    "ref_best_structure",
)
FEATURES: tuple[str, ...] = IMAGE_FEATURES + ANSWER_FEATURES
#: Features that exist only with a reference index.
_REF_FEATURES = frozenset({"ref_mean_cos", "has_refs", "ref_best_structure"})

#: How an unusual value of a feature reads in a reason: (when high, when low); "" says nothing.
#: In order of preference: of the features far outside the domain, the first one here is named
#: unless another is more than 1 / _NAMED_SHARE times as far out (a photo with a few straight
#: edges and hard edges everywhere has "many hard edges", a page "straight edges").
_PHRASES: dict[str, tuple[str, str]] = {
    "flat_share": ("much of it is flat colour", ""),
    "hv_edge_share": ("it has the straight edges of text or buildings", ""),
    "frame_gap": ("it shows one thing on a plain background", ""),
    "sky_blue": ("its top is blue like a sky", ""),
    "sky_luma": ("its top is bright like a sky", ""),
    "colour_count": ("", "it has few colours"),
    "std_r": ("its colours vary more", "its colours barely vary"),
    "std_g": ("its colours vary more", "its colours barely vary"),
    "std_b": ("its colours vary more", "its colours barely vary"),
    "clipped_share": ("much of it is pure black or white", ""),
    "strong_edge_share": ("it has many hard edges", ""),
    "block_mean_std": ("its parts differ like a scene's", "it is the same all over"),
    "sat_mean": ("its colours are more saturated", "its colours are duller"),
    "mean_r": ("its colours are unusual", "its colours are unusual"),
    "mean_g": ("its colours are unusual", "its colours are unusual"),
    "mean_b": ("its colours are unusual", "its colours are unusual"),
    "hf_ratio": ("it is noisier", "it lacks fine detail"),
    "spectral_slope": ("its detail is spread like noise", "it is blurrier"),
    "grad_mean": ("it has more sharp detail", "it is smoother"),
    "grad_p90": ("it has more sharp detail", "it is smoother"),
    "luma_entropy": ("", "it has few shades"),
    "best_gallery_cos": ("", "no place matches it closely"),
    "softmax_gap": ("", "no place stands out"),
    "softmax_entropy": ("its answer is spread over many places", ""),
    "ref_mean_cos": ("", "no reference picture resembles it"),
    "ref_best_structure": ("", "no place on the map has its layout of light and dark"),
}
#: |robust z| from which a feature is far outside the domain (then named by preference), and
#: below which it is not unusual at all.
_FAR_Z, _UNUSUAL_Z = 3.0, 2.0
_NAMED_SHARE = 0.5


# -- features -----------------------------------------------------------------------------------

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_FREQ = np.hypot(np.fft.fftfreq(SIDE)[:, None], np.fft.rfftfreq(SIDE)[None, :])
_HIGH = _FREQ > 0.25
_NONZERO = _FREQ > 0
_EDGES = np.geomspace(2 / SIDE, 0.5, 9)
_BAND = (np.digitize(_FREQ, _EDGES) - 1).ravel()  # 0..7 inside the fitted range
#: (frequencies, bands): averages the power spectrum over each log-frequency band.
_BAND_MEAN = np.stack([np.equal(_BAND, b) / max(np.equal(_BAND, b).sum(), 1) for b in range(8)], 1)
_LOGF = np.log(np.sqrt(_EDGES[:-1] * _EDGES[1:]))
#: Least-squares slope of log power over log frequency, as a dot product with log power.
_SLOPE = (_LOGF - _LOGF.mean()) / ((_LOGF - _LOGF.mean()) ** 2).sum()
#: |sin 2θ| below this: a gradient within 10 degrees of horizontal or vertical.
_AXIS = math.sin(math.radians(20))
#: The picture's border (its outer SIDE // 10 pixels) and its middle (the central half of each
#: side), as flat pixel masks: a thing photographed on a backdrop (a product, a coin, the
#: Moon, an eye's fundus) has a plain border and a middle unlike it; a view of the Earth
#: runs on past its edges. Measured on the framed square (``frame``): on an oblong picture,
#: two of its sides lie inside the picture.
_RING = SIDE // 10
_I = np.arange(SIDE)
_EDGE = np.minimum(_I, SIDE - 1 - _I)  # distance to the nearer edge along one axis
_D = np.minimum(_EDGE[:, None], _EDGE[None, :])
_BORDER = (_D < _RING).ravel()
_MIDDLE = (_D >= SIDE // 4).ravel()


def frame(img: Image.Image) -> np.ndarray:
    """(SIDE, SIDE, 3) float32 in [0, 1]: short side resized to SIDE, centre crop."""
    img = img.convert("RGB")
    w, h = img.size
    if w == h == SIDE:  # already framed (a tile of the model's own size): no resampling
        return np.asarray(img, np.float32) / 255.0
    s = SIDE / min(w, h)
    nw, nh = max(SIDE, round(w * s)), max(SIDE, round(h * s))
    # reducing_gap: a large picture is first shrunk by an integer factor, which is cheap.
    img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=2.0)
    left, top = (nw - SIDE) // 2, (nh - SIDE) // 2
    img = img.crop((left, top, left + SIDE, top + SIDE))
    return np.asarray(img, np.float32) / 255.0


def image_statistics(img: Image.Image) -> np.ndarray:
    """The IMAGE_FEATURES of one picture, as float64."""
    return image_statistics_many([img])[0]


def _mean(a: np.ndarray, axis: int) -> np.ndarray:
    """``a.mean(axis)`` of a float array, bit for bit, without numpy's Python wrapper (the
    verdict's statistics make a few dozen such calls per request)."""
    return np.add.reduce(a, axis=axis) / a.shape[axis]


def _std(a: np.ndarray, axis: int) -> np.ndarray:
    """``a.std(axis)`` of a float array, bit for bit (numpy's own steps), without its wrapper."""
    d = a - np.add.reduce(a, axis=axis, keepdims=True) / a.shape[axis]
    np.multiply(d, d, out=d)
    return np.sqrt(np.add.reduce(d, axis=axis) / a.shape[axis])


def image_statistics_many(images: Sequence[Image.Image]) -> np.ndarray:
    """(n, len(IMAGE_FEATURES)) for a batch of pictures, computed for the batch at once."""
    n = len(images)
    if not n:
        return np.zeros((0, len(IMAGE_FEATURES)))
    # Channel planes (n, 3, S*S): reductions run over contiguous memory.
    x = np.stack([frame(im) for im in images]).reshape(n, -1, 3).transpose(0, 2, 1).copy()
    r, gr, b = x[:, 0], x[:, 1], x[:, 2]
    flat_px = SIDE * SIDE
    lum = _LUMA[0] * r + _LUMA[1] * gr + _LUMA[2] * b  # (n, S*S)
    y = lum.reshape(n, SIDE, SIDE)
    mean = _mean(x, 2)
    std = _std(x, 2)
    mx, mn = np.maximum(np.maximum(r, gr), b), np.minimum(np.minimum(r, gr), b)
    sat = (mx - mn) / (mx + 1e-3)
    gx = (y[:, 1:-1, 2:] - y[:, 1:-1, :-2]) / 2
    gy = (y[:, 2:, 1:-1] - y[:, :-2, 1:-1]) / 2
    g = np.hypot(gx, gy).reshape(n, -1)
    gx, gy = gx.reshape(n, -1), gy.reshape(n, -1)
    gx2 = gx * gx
    m2, m4 = _mean(gx2, 1), _mean(gx2 * gx2, 1)
    kurt = np.log((m4 + 1e-12) / (m2 * m2 + 1e-12))
    lum_mean = _mean(lum, 1)
    spec = np.fft.rfft2(y - lum_mean[:, None, None])
    power = spec.real**2 + spec.imag**2
    power = power.reshape(n, -1)
    total = power[:, _NONZERO.ravel()].sum(axis=1)
    live = total > 1e-9
    hf = np.where(live, power[:, _HIGH.ravel()].sum(axis=1) / np.maximum(total, 1e-9), 0.0)
    band = power @ _BAND_MEAN  # (n, bands): mean power in each log-frequency band
    slope = np.where(live, np.log(band + 1e-12) @ _SLOPE, 0.0)
    bins = (lum * 31.999).astype(np.int32) + 32 * np.arange(n, dtype=np.int32)[:, None]
    hist = np.bincount(bins.ravel(), minlength=32 * n)
    p = hist.reshape(n, 32) / flat_px
    entropy = -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1) / math.log(32)
    clipped = ((mx >= 254 / 255) | (mn <= 1 / 255)).mean(axis=1)
    strong = g > 0.08
    n_strong = strong.sum(axis=1)
    # |sin 2θ| = 2|gx gy| / (gx² + gy²): no angles needed.
    axis = 2 * np.abs(gx * gy) < _AXIS * (gx2 + gy * gy)
    hv = np.where(
        n_strong >= 8,
        (axis & strong).sum(axis=1) / np.maximum(n_strong, 1),
        2 * 20 / 180,  # the share of random orientations
    )
    third = SIDE // 3 * SIDE  # the top and bottom thirds' rows, as flat pixel counts
    sky_luma = _mean(lum[:, :third], 1) - _mean(lum[:, -third:], 1)
    blue_red = b - r
    sky_blue = _mean(blue_red[:, :third], 1) - _mean(blue_red[:, -third:], 1)
    # Distinct colours at 4 bits a channel: the codes each picture uses, counted.
    q = (x * 15.999).astype(np.int32)
    codes = (q[:, 0] << 8) | (q[:, 1] << 4) | q[:, 2]
    codes += 4096 * np.arange(n, dtype=np.int32)[:, None]
    used = np.bincount(codes.ravel(), minlength=4096 * n).reshape(n, 4096)
    colours = np.count_nonzero(used, axis=1) / 4096
    blocks = y.reshape(n, 4, SIDE // 4, 4, SIDE // 4)
    blocks = blocks.transpose(0, 1, 3, 2, 4).reshape(n, 16, -1)
    b_mean, b_std = _mean(blocks, 2), _std(blocks, 2)
    p90 = np.partition(g, int(0.9 * (g.shape[1] - 1)), axis=1)[:, int(0.9 * (g.shape[1] - 1))]
    ring, middle = x[:, :, _BORDER], x[:, :, _MIDDLE]
    frame_std = _mean(_std(ring, 2), 1)
    frame_gap = np.linalg.norm(_mean(middle, 2) - _mean(ring, 2), axis=1)
    return np.column_stack(
        [
            mean,
            std,
            _mean(sat, 1),
            _std(sat, 1),
            _mean(g, 1),
            _std(g, 1),
            p90,
            kurt,
            (g < 0.01).mean(axis=1),
            hf,
            slope,
            entropy,
            clipped,
            n_strong / g.shape[1],
            hv,
            sky_luma,
            sky_blue,
            colours,
            _std(b_mean, 1) / (_std(lum, 1) + 0.02),
            _std(b_std, 1) / (_mean(b_std, 1) + 0.02),
            frame_std,
            frame_gap,
        ]
    ).astype(np.float64)


def answer_features(
    gallery_scores: np.ndarray,
    scale: float,
    ref_sims: np.ndarray | None,
    ref_structure: np.ndarray | None = None,
) -> np.ndarray:
    """The ANSWER_FEATURES of a batch.

    ``gallery_scores`` (n, k): each query's best gallery cosines, best first (missing
    results as NaN or -inf); ``scale`` the model's logit scale; ``ref_sims`` (n, m) its
    nearest reference images' cosines, or None without reference index; ``ref_structure``
    (n,) the best structure correlation among the reference images its structure search
    found (NaN or None: nothing compared, 0).
    """
    g = np.asarray(gallery_scores, dtype=np.float64)[:, :GALLERY_K]
    g = np.where(np.isfinite(g) & (g > -2), g, np.nan)
    best = g[:, :1]
    g = np.where(np.isnan(g), best, g)  # too few results: count the best again
    n, k = g.shape
    out = np.zeros((n, len(ANSWER_FEATURES)))
    if k == 0:
        return out
    z = scale * (g - g.max(axis=1, keepdims=True))
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    out[:, 0] = g[:, 0]
    out[:, 1] = g[:, 0] - g.mean(axis=1)
    out[:, 2] = -(p * np.log(np.maximum(p, 1e-300))).sum(axis=1) / math.log(max(k, 2))
    ps = -np.sort(-p, axis=1)
    out[:, 3] = ps[:, 0] - (ps[:, 1] if k > 1 else 0.0)
    if ref_sims is not None:
        r = np.asarray(ref_sims, dtype=np.float64)[:, :NEIGHBOURS_K]
        with np.errstate(invalid="ignore"):
            found = np.isfinite(r) & (r > -2)  # missing results are NaN or -inf
        count = found.sum(axis=1)
        # The mean over the found ones; 0 where none was found.
        out[:, 4] = np.where(found, r, 0.0).sum(axis=1) / np.maximum(count, 1)
        out[:, 5] = 1.0
        if ref_structure is not None:
            out[:, 6] = np.nan_to_num(np.asarray(ref_structure, dtype=np.float64), nan=0.0)
    return out


# -- the classifier -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Classifier:
    """standardise -> clip -> [z, typicality] -> tanh(. W1 + b1) -> w2 · h + b2 -> logistic.

    The typicality input is the log Mahalanobis distance of z from the in-domain pictures of
    the fit (their mean and shrunk covariance): pictures unlike anything in the domain are far
    in it whichever way they differ, also in directions no negative kind covered.
    """

    mean: np.ndarray
    scale: np.ndarray
    centre: np.ndarray
    precision: np.ndarray
    typ_mean: float
    typ_scale: float
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: float

    def scores(self, x: np.ndarray) -> np.ndarray:
        return _forward(_stack((self,)), x)[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "centre": self.centre.tolist(),
            "precision": self.precision.tolist(),
            "typ_mean": float(self.typ_mean),
            "typ_scale": float(self.typ_scale),
            "w1": self.w1.tolist(),
            "b1": self.b1.tolist(),
            "w2": self.w2.tolist(),
            "b2": float(self.b2),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], n_features: int) -> Classifier:
        arrays = {
            k: np.asarray(d[k], float)
            for k in ("mean", "scale", "centre", "precision", "w1", "b1", "w2")
        }
        hidden = len(arrays["b1"])
        shapes = {
            "mean": (n_features,),
            "scale": (n_features,),
            "centre": (n_features,),
            "precision": (n_features, n_features),
            "w1": (n_features + 1, hidden),
            "w2": (hidden,),
        }
        if any(arrays[k].shape != shape for k, shape in shapes.items()):
            raise ValueError("the classifier's arrays do not fit its features")
        numbers = [float(d["typ_mean"]), float(d["typ_scale"]), float(d["b2"])]
        if not all(np.isfinite(a).all() for a in arrays.values()) or not np.isfinite(numbers).all():
            raise ValueError("the classifier has values that are not finite")
        if (arrays["scale"] <= 0).any() or numbers[1] <= 0:
            raise ValueError("the classifier has scales that are not positive")
        return cls(
            arrays["mean"],
            arrays["scale"],
            arrays["centre"],
            arrays["precision"],
            numbers[0],
            numbers[1],
            arrays["w1"],
            arrays["b1"],
            arrays["w2"],
            numbers[2],
        )


def _stack(classifiers: Sequence[Classifier]) -> dict[str, np.ndarray]:
    """The classifiers' arrays and numbers, each stacked along a first axis (one per
    classifier), for ``_forward``."""
    return {
        f.name: np.stack([np.asarray(getattr(c, f.name), np.float64) for c in classifiers])
        for f in fields(Classifier)
    }


def _forward(a: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """(classifiers, n) scores of rows ``x`` (n, F) by stacked classifiers (``_stack``): every
    classifier in one pass of array calls, as the verdict is paid on every request."""
    x = np.asarray(x, np.float64)[None]  # (1, n, F) against (C, ...) arrays
    z = np.clip((x - a["mean"][:, None]) / a["scale"][:, None], -CLIP_Z, CLIP_Z)
    t = _typicality(z, a["centre"][:, None], a["precision"])
    t = np.clip((t - a["typ_mean"][:, None]) / a["typ_scale"][:, None], -CLIP_Z, CLIP_Z)
    h = np.tanh(np.concatenate([z, t[..., None]], axis=2) @ a["w1"] + a["b1"][:, None])
    logits = np.einsum("cnh,ch->cn", h, a["w2"]) + a["b2"][:, None]
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))


def _typicality(z: np.ndarray, centre: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """log(1 + Mahalanobis² / F) of rows z (..., n, F) from ``centre`` (..., 1 or n, F)."""
    d = z - centre
    d2 = np.einsum("...nf,...fg,...ng->...n", d, precision, d)
    return np.log1p(np.maximum(d2, 0.0) / z.shape[-1])


def _in_domain_shape(
    z: np.ndarray, used: np.ndarray, shrink: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and precision (shrunk covariance, inverted) of in-domain rows, over the ``used``
    features only (the others get zero weight)."""
    f = z.shape[1]
    centre = np.zeros(f)
    centre[used] = z[:, used].mean(axis=0)
    cov = np.cov(z[:, used], rowvar=False).reshape(int(used.sum()), int(used.sum()))
    cov = (1 - shrink) * cov + shrink * np.eye(len(cov)) * max(
        float(np.trace(cov)) / len(cov), 1e-6
    )
    precision = np.zeros((f, f))
    precision[np.ix_(used, used)] = np.linalg.inv(cov)
    return centre, precision


def train_classifier(
    x: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray,
    *,
    typical: np.ndarray,
    hidden: int = 16,
    epochs: int = 600,
    lr: float = 0.02,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> Classifier:
    """Full-batch Adam on the weighted log loss; deterministic for a seed. ``typical``: the
    in-domain rows (as served) that the typicality input measures distance from."""
    import torch

    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), 1e-6)
    z = np.clip((x - mean) / scale, -CLIP_Z, CLIP_Z)
    zt_ = np.clip((typical - mean) / scale, -CLIP_Z, CLIP_Z)
    used = np.array([f not in _REF_FEATURES for f in FEATURES])
    centre, precision = _in_domain_shape(zt_, used)
    t = _typicality(z, centre, precision)
    t_pos = _typicality(zt_, centre, precision)
    typ_mean, typ_scale = float(t_pos.mean()), max(float(t_pos.std()), 1e-6)
    inputs = np.column_stack([z, np.clip((t - typ_mean) / typ_scale, -CLIP_Z, CLIP_Z)])
    gen = torch.Generator().manual_seed(seed)
    zt = torch.as_tensor(inputs, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    wt = torch.as_tensor(weight / weight.sum(), dtype=torch.float64)
    n_in = inputs.shape[1]
    w1 = torch.randn(n_in, hidden, generator=gen, dtype=torch.float64) / math.sqrt(n_in)
    w2 = torch.randn(hidden, generator=gen, dtype=torch.float64) / math.sqrt(hidden)
    params = [
        w1,
        torch.zeros(hidden, dtype=torch.float64),
        w2,
        torch.zeros((), dtype=torch.float64),
    ]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            logit = torch.tanh(zt @ params[0] + params[1]) @ params[2] + params[3]
            loss = (loss_fn(logit, yt, reduction="none") * wt).sum()
            loss = loss + weight_decay * (params[0].square().sum() + params[2].square().sum())
            loss.backward()
            opt.step()
    w1_, b1_, w2_, b2_ = (p.detach().numpy().copy() for p in params)
    return Classifier(
        mean, scale, centre, precision, typ_mean, typ_scale, w1_, b1_, w2_, float(b2_)
    )


# -- the verdict --------------------------------------------------------------------------------


def domain_words(purpose: str) -> str:
    """'satellite views of the Earth's surface (not ground photos)' -> without the aside."""
    return re.sub(r"\s*\([^)]*\)", "", purpose).strip() or "pictures"


@dataclass(frozen=True)
class LocalizabilityModel:
    #: The cross-fitted classifiers (one per fold); a picture's score is their mean.
    classifiers: tuple[Classifier, ...]
    t_low: float
    t_high: float
    domain: str
    purpose: str
    #: Whether the reference-neighbour features were fitted (else they are left out).
    uses_refs: bool
    #: Per feature, the in-domain median and spread (for the reasons).
    typical_median: np.ndarray
    typical_scale: np.ndarray
    fit: dict[str, Any] = field(default_factory=dict)
    features: tuple[str, ...] = FEATURES
    gallery_k: int = GALLERY_K
    neighbours_k: int = NEIGHBOURS_K
    format: int = FORMAT

    @cached_property
    def _what(self) -> str:
        return domain_words(self.purpose)

    @cached_property
    def _phrases(self) -> list[tuple[int, str, str]]:
        """(feature column, phrase when high, phrase when low), in _PHRASES order."""
        return [(self.features.index(n), hi, lo) for n, (hi, lo) in _PHRASES.items()]

    @cached_property
    def _stacked(self) -> dict[str, np.ndarray]:
        return _stack(self.classifiers)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """The mean of the classifiers' scores."""
        return _forward(self._stacked, x).mean(axis=0)

    def shares(self, x: np.ndarray) -> dict[str, Any]:
        """How the rows ``x`` are judged: the share of each verdict, and of those flagged."""
        return _rates(self.scores(x), self.t_low, self.t_high)

    def verdict(self, score: float) -> str:
        if score < self.t_low:
            return "not_locatable"
        return "located" if score >= self.t_high else "uncertain"

    def reason(self, verdict: str, x: np.ndarray) -> str:
        what = self._what
        if verdict == "located":
            return f"like the {what} this model knows"
        why = self._most_unusual(x)
        if verdict == "uncertain":
            return f"like the {what} this model knows, but " + (why or "not clearly so")
        return f"unlike the {what} this model was trained on" + (f": {why}" if why else "")

    def _most_unusual(self, x: np.ndarray) -> str:
        """The phrase of the feature that most sets the picture apart from the domain: the
        first (in _PHRASES order) of those far outside it and at least _NAMED_SHARE as far out
        as the furthest, else the most unusual one."""
        z = (np.asarray(x, float) - self.typical_median) / self.typical_scale
        candidates: list[tuple[int, float, str]] = []
        for rank, (i, high, low) in enumerate(self._phrases):
            phrase = high if z[i] > 0 else low
            if phrase and abs(z[i]) >= _UNUSUAL_Z:
                candidates.append((rank, abs(float(z[i])), phrase))
        far = [c for c in candidates if c[1] >= _FAR_Z]
        if far:
            furthest = max(c[1] for c in far)
            return min(c for c in far if c[1] >= _NAMED_SHARE * furthest)[2]
        return max(candidates, key=lambda c: c[1])[2] if candidates else ""

    def judge(self, x: np.ndarray, abstain_below: float | None = None) -> list[dict[str, Any]]:
        """Each row's ``{"score", "verdict", "reason", "abstained"}``; the service abstains
        below ``abstain_below`` (default ``t_low``)."""
        x = np.atleast_2d(np.asarray(x, float))
        below = self.t_low if abstain_below is None else abstain_below
        out = []
        for row, s in zip(x, self.scores(x), strict=True):
            v = self.verdict(float(s))
            out.append(
                {
                    "score": float(s),
                    "verdict": v,
                    "reason": self.reason(v, row),
                    "abstained": bool(s < below),
                }
            )
        return out

    def summary(self) -> dict[str, Any]:
        """The figures /v1/info shows."""
        fit = self.fit
        return {
            "t_low": self.t_low,
            "t_high": self.t_high,
            "domain": self.domain,
            "uses_reference_images": self.uses_refs,
            "in_domain": fit.get("validation", {}).get("in_domain"),
            "negatives": fit.get("validation", {}).get("negatives"),
            "negative_kinds": fit.get("negative_kinds"),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "features": list(self.features),
            "gallery_k": self.gallery_k,
            "neighbours_k": self.neighbours_k,
            "classifiers": [c.to_dict() for c in self.classifiers],
            "t_low": self.t_low,
            "t_high": self.t_high,
            "domain": self.domain,
            "purpose": self.purpose,
            "uses_refs": self.uses_refs,
            "typical": {
                "median": self.typical_median.tolist(),
                "scale": self.typical_scale.tolist(),
            },
            "fit": self.fit,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LocalizabilityModel:
        """Raises ValueError (or KeyError/TypeError) for anything that is not a model this
        code computes the features of."""
        if d.get("format") != FORMAT:
            raise ValueError(f"unknown localizability format {d.get('format')!r}")
        if tuple(d["features"]) != FEATURES:
            raise ValueError("it was fitted on other features than this geoloc computes")
        if d["gallery_k"] != GALLERY_K or d["neighbours_k"] != NEIGHBOURS_K:
            raise ValueError("it was fitted with other answer-shape depths")
        t_low, t_high = float(d["t_low"]), float(d["t_high"])
        if not 0 <= t_low <= t_high <= 1:
            raise ValueError(f"thresholds {t_low!r}, {t_high!r} are not 0 <= t_low <= t_high <= 1")
        median = np.asarray(d["typical"]["median"], float)
        spread = np.asarray(d["typical"]["scale"], float)
        shape = (len(FEATURES),)
        if median.shape != shape or spread.shape != shape:
            raise ValueError("its typical values do not fit its features")
        if not (np.isfinite(median).all() and np.isfinite(spread).all() and (spread > 0).all()):
            raise ValueError("its typical values are not finite and positive")
        if not isinstance(d.get("classifiers"), list) or not d["classifiers"]:
            raise ValueError("it has no classifiers")
        return cls(
            classifiers=tuple(Classifier.from_dict(c, len(FEATURES)) for c in d["classifiers"]),
            t_low=t_low,
            t_high=t_high,
            domain=str(d["domain"]),
            purpose=str(d["purpose"]),
            uses_refs=bool(d["uses_refs"]),
            typical_median=median,
            typical_scale=spread,
            fit=dict(d.get("fit") or {}),
        )


# -- fitting ------------------------------------------------------------------------------------


def _weights(y: np.ndarray, kinds: np.ndarray) -> np.ndarray:
    """Positives and negatives weigh half each; every negative kind the same."""
    w = np.zeros(len(y))
    pos = y == 1
    w[pos] = 0.5 / max(int(pos.sum()), 1)
    names = np.unique(kinds[~pos])
    for k in names:
        m = (~pos) & (kinds == k)
        w[m] = 0.5 / len(names) / m.sum()
    return w


def _drop_refs(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    for name in _REF_FEATURES:
        out[:, FEATURES.index(name)] = 0.0
    return out


def _thresholds(pos_scores: np.ndarray, neg_scores: np.ndarray) -> tuple[float, float]:
    t_low = float(np.quantile(pos_scores, IN_DOMAIN_BELOW_LOW))
    # The smallest value that at most NEGATIVES_ABOVE_HIGH of the negatives reach.
    s = np.sort(neg_scores)
    k = math.floor(NEGATIVES_ABOVE_HIGH * len(s))  # negatives allowed at or above
    t_high = float(np.nextafter(s[len(s) - k - 1], np.inf)) if len(s) else 1.0
    t_high = max(t_high, float(np.quantile(pos_scores, IN_DOMAIN_BELOW_HIGH)))
    t_high = min(max(t_high, t_low), 1.0)
    return t_low, t_high


def _rates(scores: np.ndarray, t_low: float, t_high: float) -> dict[str, Any]:
    n = len(scores)
    if not n:
        return {"n": 0}
    low = float(np.mean(scores < t_low))
    high = float(np.mean(scores >= t_high))
    between = float(np.mean((scores >= t_low) & (scores < t_high)))
    return {
        "n": n,
        "located": round(high, 4),
        "uncertain": round(between, 4),
        "not_locatable": round(low, 4),
        "flagged": round(1 - high, 4),
    }


#: Folds of the cross-fit: each classifier of the verdict is trained on all but one fold, and
#: every picture of the fit is scored by the one classifier that never saw it. The thresholds
#: come from those out-of-fold scores of all the fit's pictures, not from one small held-back
#: split (whose top 1 % of negatives is a handful of pictures: the thresholds, and the
#: verdicts near them, moved with the split and the seed).
FOLDS = 5


def _folds(kinds: np.ndarray, n_pos: int, rng: np.random.Generator) -> np.ndarray:
    """A fold for each row (positives first, then the negatives of ``kinds``): the positives
    and every negative kind spread evenly over the folds (``fit_localizability`` asks for at
    least FOLDS of each kind, so that every fold holds every kind)."""
    fold = np.empty(n_pos + len(kinds), dtype=np.int64)
    fold[:n_pos] = rng.permutation(np.arange(n_pos) % FOLDS)
    for k in np.unique(kinds):
        idx = n_pos + np.flatnonzero(kinds == k)
        fold[idx] = rng.permutation(np.arange(len(idx)) % FOLDS)
    return fold


def _fit_one(x: np.ndarray, y: np.ndarray, k: np.ndarray, uses_refs: bool, seed: int) -> Classifier:
    typical = x[y == 1]
    if uses_refs:  # also without the reference index, so that the model serves both ways
        x, y, k = np.concatenate([x, _drop_refs(x)]), np.concatenate([y, y]), np.concatenate([k, k])
    return train_classifier(x, y, _weights(y, k), typical=typical, seed=seed)


def fit_localizability(
    pos: np.ndarray,
    neg: np.ndarray,
    kinds: Sequence[str],
    *,
    purpose: str,
    domain: str,
    seed: int = 0,
    leave_one_out: bool = True,
    notes: dict[str, Any] | None = None,
) -> LocalizabilityModel:
    """Fit on in-domain feature rows ``pos`` and synthetic negatives ``neg`` (their ``kinds``).

    Cross-fitted over FOLDS folds (per kind for negatives): one classifier per fold, trained on
    the other folds; the served score is their mean. The thresholds are fitted on the
    out-of-fold scores, and the figures recorded are measured on them: one classifier's
    figures, which the served mean meets or errs on the cautious side of (averaging pulls
    scores away from 0 and 1, into ``uncertain``). With ``leave_one_out``
    every negative kind is also left out of a fit in turn, and the share of it that is still
    flagged is recorded: how the verdict holds for kinds of pictures it never saw.
    """
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    kinds_arr = np.asarray(list(kinds), dtype=object)
    if pos.shape[1:] != (len(FEATURES),) or neg.shape[1:] != (len(FEATURES),):
        raise ValueError(f"feature rows must have {len(FEATURES)} columns")
    if len(pos) < 20 or len(np.unique(kinds_arr)) < 2:
        raise ValueError(
            f"{len(pos)} in-domain pictures and {len(np.unique(kinds_arr))} negative kinds; "
            "the localizability fit needs at least 20 and 2"
        )
    fewest = min(int(np.sum(kinds_arr == k)) for k in np.unique(kinds_arr))
    if fewest < FOLDS:
        raise ValueError(
            f"{fewest} generated pictures of a negative kind; the localizability fit needs at "
            f"least {FOLDS} of each, one per fold (GEOLOC_CALIBRATION_NEGATIVES)"
        )
    uses_refs = bool(np.any(pos[:, FEATURES.index("has_refs")] > 0))
    if not uses_refs:
        pos, neg = _drop_refs(pos), _drop_refs(neg)
    x = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    k = np.concatenate([np.full(len(pos), ""), kinds_arr]).astype(object)
    fold = _folds(kinds_arr, len(pos), np.random.default_rng(seed))
    is_pos = y == 1
    classifiers = []
    oof, oof_nr = np.empty(len(x)), np.empty(len(x))
    for f in range(FOLDS):
        out = fold == f
        clf = _fit_one(x[~out], y[~out], k[~out], uses_refs, seed * FOLDS + f)
        classifiers.append(clf)
        oof[out] = clf.scores(x[out])
        oof_nr[out] = clf.scores(_drop_refs(x[out]))
    t_low, t_high = _thresholds(oof[is_pos], oof[~is_pos])
    names = sorted(set(kinds_arr))
    validation = {
        "in_domain": _rates(oof[is_pos], t_low, t_high),
        "negatives": _rates(oof[~is_pos], t_low, t_high),
        "per_kind": {n: _rates(oof[k == n], t_low, t_high) for n in names},
    }
    if uses_refs:  # the same pictures served without the reference index
        validation["without_reference_images"] = {
            "in_domain": _rates(oof_nr[is_pos], t_low, t_high),
            "negatives": _rates(oof_nr[~is_pos], t_low, t_high),
        }
    loko: dict[str, Any] = {}
    if leave_one_out:
        # One classifier per kind, trained on folds 1.. without that kind; its thresholds from
        # fold 0's pictures of the other kinds; judged on every picture of the kind.
        held = fold == 0
        for n in names:
            train = ~held & (k != n)
            c = _fit_one(x[train], y[train], k[train], uses_refs, seed)
            held_pos = c.scores(x[held & is_pos])
            lo, hi = _thresholds(held_pos, c.scores(x[held & ~is_pos & (k != n)]))
            r = _rates(c.scores(x[k == n]), lo, hi)
            loko[n] = {
                "flagged": r["flagged"],
                "not_locatable": r["not_locatable"],
                "in_domain_not_locatable": _rates(held_pos, lo, hi)["not_locatable"],
            }
    med = np.median(pos, axis=0)
    q75, q25 = np.percentile(pos, [75, 25], axis=0)
    spread = np.maximum((q75 - q25) / 1.349, np.maximum(np.abs(med) * 0.05, 1e-3))
    fit = {
        "in_domain_images": len(pos),
        "negative_images": len(neg),
        "negative_kinds": {n: int(np.sum(kinds_arr == n)) for n in names},
        "folds": FOLDS,
        "seed": seed,
        "targets": {
            "in_domain_below_t_low": IN_DOMAIN_BELOW_LOW,
            "negatives_at_or_above_t_high": NEGATIVES_ABOVE_HIGH,
            "in_domain_below_t_high": IN_DOMAIN_BELOW_HIGH,
        },
        "validation": validation,
        "leave_one_kind_out": loko,
        **(notes or {}),
    }
    return LocalizabilityModel(
        classifiers=tuple(classifiers),
        t_low=t_low,
        t_high=t_high,
        domain=domain,
        purpose=purpose,
        uses_refs=uses_refs,
        typical_median=med,
        typical_scale=spread,
        fit=fit,
    )


def fit_lines(model: dict[str, Any]) -> list[str]:
    """A stored model's fit figures (``LocalizabilityModel.to_dict``) as terminal lines."""
    fit = model.get("fit", {})
    val = fit.get("validation", {})
    pos, neg = val.get("in_domain", {}), val.get("negatives", {})

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * float(v):.1f} %"

    lines = [
        f"localizability: t_low {model['t_low']:.4f}, t_high {model['t_high']:.4f}; "
        f"{fit.get('in_domain_images')} in-domain images, {fit.get('negative_images')} "
        f"generated negatives of {len(fit.get('negative_kinds', {}))} kinds",
        f"  out of fold: in-domain {pct(pos.get('located'))} located, "
        f"{pct(pos.get('not_locatable'))} not_locatable; negatives {pct(neg.get('flagged'))} "
        f"flagged, {pct(neg.get('not_locatable'))} not_locatable",
    ]
    loko = fit.get("leave_one_kind_out") or {}
    if loko:
        worst = sorted(loko.items(), key=lambda kv: kv[1]["flagged"])[:3]
        lines.append(
            "  leave-one-kind-out, still flagged: "
            + ", ".join(f"{k} {pct(v['flagged'])}" for k, v in worst)
            + f" (lowest {len(worst)} of {len(loko)})"
        )
    return lines
