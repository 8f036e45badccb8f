"""Albums: several pictures of one place, located jointly.

The locator pools the candidates of every picture of an album and scores each pooled point
against every picture with the same image↔GPS logits verification uses (``Locator._logits``:
GPS-tower similarity plus the picture's reference-neighbour support). This module combines
those per-picture scores into one answer; it is plain numpy (no torch, no HTTP).

The combination, per pooled point ``c`` and picture ``i``:

- ``log p_i(c)``: the picture's own softmax over the pooled points, at the calibrated
  temperature;
- a mixture with a uniform component, ``p~_i = (1 - ε) p_i + ε / m``: one picture can lower a
  point by at most ``log ε/m``, so a picture from elsewhere (or with no location cues) cannot
  veto the place the others agree on;
- the joint logit ``J(c) = Σ_i w_i log p~_i(c) / τ`` (``τ``: the album temperature; the
  pictures of one place are not independent evidence, so their product is tempered);
- the weights ``w_i = l_i · r_i``: ``l_i`` the picture's localizability score (0 when its
  answer abstains), ``r_i`` its agreement with the joint answer: how probable the picture
  finds the joint distribution ``q = softmax(J)``, relative to how probable it finds its own,
  ``min(1, Σ_c q(c) p_i(c) / Σ_c p_i(c)²)``, divided by the best picture's (so the picture
  that agrees best has 1). A picture of the same place scores about 1; a confident picture of
  another place about 0; a picture with no location cues (a flat ``p_i``) about 1 (it moves
  nothing). A few rounds of this reweighting settle; a picture with agreement below
  ``outlier_below`` is an outlier. With regions (below), these rounds run in the regions'
  combination, and the album spread's takes their agreement as it is.

Which region, and where in it (``regional``). Kernels widened by the album's spread place the
answer finely, but narrow views' pictures of one place, each sharp around its own spot, agree
on the region less often than with kernels wider still. So the pictures are combined twice,
with the album's spread and with ``region_spread`` times it; each pooled point's region (the
points within ``region_radius`` times the spread) gets the mass the wide combination gives it,
shared among its points as the album's spread shares it. The pictures' agreement, weights and
outliers are the wide combination's: whether a picture agrees is a question about the region
(a picture of the place taken 40 km from the others agrees with them), and the album's spread
then places the answer with those weights.

Everything is an (n, m) or (m, m) array operation: no loop over picture-candidate pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import logsumexp

from index.geo import pairwise_km
from service.engine.options import AlbumConfig
from service.engine.results import LocateResult

__all__ = [
    "AlbumConfig",
    "AlbumResult",
    "Combined",
    "album_verdict",
    "combine",
    "combine_regions",
    "regional",
]

#: Rounds of reweighting (each: joint, then every picture's agreement with it).
ROUNDS = 4


@dataclass
class Combined:
    """The joint answer over the pooled points, and each picture's part in it."""

    logits: np.ndarray  # (m,) joint logits J (already divided by τ)
    weights: np.ndarray  # (n,) w_i / Σ w (0 for pictures left out)
    agreement: np.ndarray  # (n,) r_i in [0, 1]
    outlier: np.ndarray  # (n,) bool


@dataclass
class AlbumResult:
    """An album's joint answer, each picture's own answer, and each picture's part."""

    joint: LocateResult
    images: list[LocateResult]
    weights: np.ndarray  # (n,) share of the joint answer's evidence; sums to 1
    agreement: np.ndarray  # (n,) agreement with the (regions') joint answer, in [0, 1]
    outlier: np.ndarray  # (n,) bool
    spread_km: float  # how far apart the pictures were taken, as the answer assumed

    def parts(self) -> list[dict[str, Any]]:
        """Each picture's ``{"weight", "agreement", "outlier"}``."""
        return [
            {"weight": float(w), "agreement": float(a), "outlier": bool(o)}
            for w, a, o in zip(self.weights, self.agreement, self.outlier, strict=True)
        ]


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return x - (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)))


def combine(
    logits: np.ndarray,
    localizability: np.ndarray,
    config: AlbumConfig,
    agreement: np.ndarray | None = None,
) -> Combined:
    """Joint logits over m pooled points from each picture's ``logits`` (n, m), already at the
    calibrated temperature, and its ``localizability`` (n,) prior weight in [0, 1].
    ``agreement``: each picture's agreement as another combination of the same pictures found
    it (the regions'), used as it is instead of the rounds of reweighting."""
    logits = np.asarray(logits, dtype=np.float64)
    n, m = logits.shape
    prior = np.clip(np.nan_to_num(np.asarray(localizability, dtype=np.float64)), 0.0, 1.0)
    if not prior.any():  # every picture abstains: combine them evenly (the verdict says so)
        prior = np.ones(n)
    if not m:  # no candidate at all (the request's filters): nothing to agree on
        return Combined(np.empty(0), prior / prior.sum(), np.ones(n), np.zeros(n, dtype=bool))
    eps = float(np.clip(config.uniform, 1e-9, 1.0 - 1e-9))
    logp = log_softmax(logits, axis=1)  # log p_i
    p = np.exp(logp)
    mix = np.logaddexp(np.log1p(-eps) + logp, np.log(eps / m))  # log p~_i
    self_match = np.einsum("ij,ij->i", p, p)  # Σ_c p_i(c)²: the picture's own typical match
    if agreement is not None:
        agreement = np.clip(np.nan_to_num(np.asarray(agreement, dtype=np.float64)), 0.0, 1.0)
        if agreement.shape != (n,):
            raise ValueError(f"agreement has shape {agreement.shape}; expected ({n},)")
        weights = _weighed(prior, agreement)
    else:
        weights = prior.copy()
        agreement = np.ones(n)
        for _ in range(ROUNDS):
            joint = weights @ mix / config.temperature
            q = np.exp(log_softmax(joint))
            match = np.minimum(1.0, (p @ q) / self_match)
            agreement = match / max(float(match[prior > 0].max()), 1e-12)
            weights = _weighed(prior, agreement)
    joint = weights @ mix / config.temperature
    total = weights.sum()
    return Combined(
        logits=joint,
        weights=weights / total if total > 0 else weights,
        agreement=agreement,
        outlier=(agreement < config.outlier_below) & (prior > 0),
    )


def _weighed(prior: np.ndarray, agreement: np.ndarray) -> np.ndarray:
    """Each picture's weight: its prior times its agreement, or the prior alone where no
    picture agrees at all (then nothing tells them apart)."""
    weights = prior * agreement
    return weights if weights.any() else prior


def regional(
    distance_km: np.ndarray, fine: np.ndarray, coarse: np.ndarray, radius_km: float
) -> np.ndarray:
    """Joint logits whose regions weigh as in ``coarse`` and whose points share their region's
    mass as in ``fine``: ``fine(c) - log Σ_R(c) exp fine + log Σ_R(c) exp coarse``, where R(c)
    is the points within ``radius_km`` of c (``distance_km``: the (m, m) distances). Where the
    points fall into groups farther apart than the radius, each group's mass is ``coarse``'s
    exactly; where neighbourhoods overlap, each point's own neighbourhood is rescaled, so the
    masses are ``coarse``'s approximately. Where the two agree on the regions this is ``fine``
    again; a point that is -inf in ``fine`` stays so.
    """
    fine = np.asarray(fine, dtype=np.float64)
    if not len(fine):
        return fine
    near = np.asarray(distance_km) <= radius_km

    def region_sums(x: np.ndarray) -> np.ndarray:
        # Masked to each region, so that every row is shifted by its own largest logit.
        return logsumexp(np.where(near, x[None, :], -np.inf), axis=1)

    with np.errstate(invalid="ignore"):  # -inf - -inf where a region is all ruled out: kept below
        out = fine - region_sums(fine) + region_sums(np.asarray(coarse, dtype=np.float64))
    return np.where(np.isfinite(fine), out, fine)


def combine_regions(
    latlon: np.ndarray, logits: np.ndarray, localizability: np.ndarray, config: AlbumConfig
) -> Combined:
    """The joint answer over m pooled points ``latlon`` (m, 2) from each picture's logits under
    the album's spread and, with regions, under the regions' ((2, n, m), else (1, n, m)),
    already at the calibrated temperature. Whether a picture agrees is asked of the regions'
    combination (a picture of the place taken tens of km from the others agrees with them
    there); the album's spread then places the answer with those weights, and ``regional``
    gives each region the regions' mass. Without regions (``config.regions``), the album
    spread's combination alone."""
    if not config.regions:
        return combine(logits[0], localizability, config)
    coarse = combine(logits[1], localizability, config)
    fine = combine(logits[0], localizability, config, coarse.agreement)
    radius = config.region_radius * config.spread_km
    fine.logits = regional(pairwise_km(latlon, latlon), fine.logits, coarse.logits, radius)
    return fine


def album_verdict(
    verdicts: list[dict[str, Any] | None],
    combined: Combined,
    verdict_of: Any,
    abstain_below: float | None,
) -> dict[str, Any] | None:
    """The album's localizability: that of its most locatable picture that agrees with the
    joint answer (an album is as locatable as its best consistent picture), ``uncertain`` at
    most when most of its locatable pictures disagree with it. ``verdict_of(score)`` is the
    fitted model's verdict for a score. None when the pictures carry no verdict."""
    if not verdicts or any(v is None for v in verdicts):
        return None
    n = len(verdicts)
    agree = ~combined.outlier & (combined.weights > 0)  # took part, and agree
    scores = np.array([float(v["score"]) for v in verdicts])  # type: ignore[index]
    pool = np.flatnonzero(agree) if agree.any() else np.arange(n)
    best = int(pool[np.argmax(scores[pool])])
    score = float(scores[best])
    verdict = str(verdict_of(score))
    reason = str(verdicts[best]["reason"])  # type: ignore[index]
    located = [i for i, v in enumerate(verdicts) if v["verdict"] == "located"]  # type: ignore[index]
    disagree = [i for i in located if combined.outlier[i]]
    if verdict == "located" and len(located) >= 2 and 2 * len(disagree) > len(located):
        verdict, reason = "uncertain", "the pictures disagree about the place"
    agreeing = int(agree.sum())
    reason = f"{agreeing} of {n} pictures agree; {reason}"
    return {
        "score": score,
        "verdict": verdict,
        "reason": reason,
        "abstained": bool(abstain_below is not None and score < abstain_below),
    }
