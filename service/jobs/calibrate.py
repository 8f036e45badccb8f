"""Fit a calibration: the softmax temperature on held-out pictures with known locations, and
the localizability verdict against generated negatives (``geoloc calibrate``; the artifact:
service/engine/calibration.py)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from index.geo import haversine_km
from service.engine.localizability import LocalizabilityModel
from service.engine.locator import NEAR_COPY_ODDS, Locator
from service.engine.options import LocateOptions
from service.engine.places import lift_near_copy, merge_places, nms_owners
from service.engine.scores import reliability

if TYPE_CHECKING:
    from PIL import Image

from service.engine.calibration import CalibrationError

log = logging.getLogger(__name__)

#: Temperatures searched (log-spaced); the best is then refined by golden-section search.
T_MIN, T_MAX = 0.02, 50.0


@dataclass(frozen=True)
class _Case:
    """One held-out image: its candidates' logits, which of them form the top-1 place (the
    pipeline ranks places at temperature 1, so the same for every temperature) and that
    place's distance to the truth."""

    logits: np.ndarray
    top_place: np.ndarray  # bool: merged into the top-1 place
    d_km: float
    copy: int | None = None  # where its near copy is (lifted at every temperature, as served)


def prepare_cases(
    pools: list[tuple[np.ndarray, np.ndarray, int | None]],
    truths: np.ndarray,
    *,
    nms_km: float,
    diversify: bool,
) -> list[_Case]:
    cases = []
    for (latlon, logits, copy), (lat, lon) in zip(pools, np.asarray(truths), strict=True):
        if not len(logits):
            continue
        order = np.argsort(-logits, kind="stable")
        pts, z = latlon[order], logits[order]
        owner = nms_owners(pts, nms_km) if diversify else np.arange(len(pts))
        keep, _ = merge_places(owner, np.exp(z - z[0]))
        d = float(haversine_km(pts[keep[0], 0], pts[keep[0], 1], lat, lon))
        at = None if copy is None else int(np.flatnonzero(order == copy)[0])
        cases.append(_Case(z, owner == keep[0], d, at))
    return cases


def top1(cases: list[_Case], temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(probability, error km) of each case's top-1 place at a temperature, as the
    pipeline states them (softmax, then diversify's merge)."""
    conf = np.empty(len(cases))
    for i, c in enumerate(cases):
        z = c.logits
        if c.copy is not None:
            z = lift_near_copy(z, c.copy, NEAR_COPY_ODDS, temperature)
        p = np.exp((z - z.max()) / temperature)
        conf[i] = p[c.top_place].sum() / p.sum()
    return conf, np.array([c.d_km for c in cases])


def _nll(conf: np.ndarray, hit: np.ndarray) -> float:
    c = np.clip(conf, 1e-6, 1 - 1e-6)
    return float(-np.mean(np.where(hit, np.log(c), np.log1p(-c))))


def fit_temperature(
    cases: list[_Case], *, within_km: float, bins: int = 10
) -> tuple[float, dict[str, Any]]:
    """The temperature minimising the log loss of "top-1 within ``within_km``" given the
    top-1 probability; and the fit's figures at temperature 1 and at the fitted one."""
    if len(cases) < 20:
        raise CalibrationError(f"{len(cases)} usable images; calibration needs at least 20")

    def loss(log_t: float) -> float:
        conf, err = top1(cases, math.exp(log_t))
        return _nll(conf, err <= within_km)

    grid = np.linspace(math.log(T_MIN), math.log(T_MAX), 41)
    losses = [loss(g) for g in grid]
    b = int(np.argmin(losses))
    lo, hi = grid[max(b - 1, 0)], grid[min(b + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(30):  # golden-section search in the bracket around the best grid point
        x1, x2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if loss(x1) <= loss(x2):
            hi = x2
        else:
            lo = x1
    best = math.exp((lo + hi) / 2)

    def figures(t: float) -> dict[str, Any]:
        conf, err = top1(cases, t)
        rel = reliability(conf, err, within_km=within_km, bins=bins)
        return {
            "temperature": t,
            "log_loss": _nll(conf, err <= within_km),
            "ece": rel.ece,
            "mean_confidence": rel.mean_confidence,
            "accuracy": rel.accuracy,
            "median_km": float(np.median(err)),
        }

    return best, {"images": len(cases), "before": figures(1.0), "after": figures(best)}


# -- localizability -----------------------------------------------------------------------------

#: The seed of the generated negatives' stream (tests draw theirs with other seeds).
NEGATIVES_SEED = 1_405_001


def fit_localizability_for(
    locator: Locator,
    image_stats: np.ndarray,
    vectors: np.ndarray,
    options: LocateOptions,
    *,
    per_kind: int,
    structure: np.ndarray | None = None,
    seed: int = NEGATIVES_SEED,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> LocalizabilityModel:
    """Fit the verdict of ``locator``: its held-out in-domain pictures (their image statistics,
    embeddings and, where the locator compares them, ``structure`` descriptors) against
    ``per_kind`` generated negatives of each kind of the profile's domain, which go through
    the same model and index."""
    from encoders import get_profile
    from service.engine.localizability import fit_localizability
    from service.engine.negatives import kinds_for, negatives

    profile = get_profile(locator.model.profile)
    pos = locator.judge_features(vectors, image_stats, options, structure)
    rows: list[np.ndarray] = []
    kinds: list[str] = []

    def run(batch: Iterable[tuple[str, Image.Image]]) -> None:
        names, images = zip(*batch, strict=True)
        rows.append(locator.picture_features(images, options))
        kinds.extend(names)
        if progress is not None:
            progress(len(images))

    batch: list[tuple[str, Image.Image]] = []
    for item in negatives(kinds_for(profile.domain), per_kind, seed, profile.domain):
        batch.append(item)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    refs = locator.neighbours.manifest if locator.neighbours is not None else None
    return fit_localizability(
        pos,
        np.vstack(rows),
        kinds,
        purpose=profile.purpose,
        domain=profile.domain,
        notes={
            "reference_index": f"{refs.name}/{refs.version}" if refs else None,
            "negatives_seed": seed,
        },
    )
