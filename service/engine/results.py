"""What the locator works on and answers: a query's candidate pool and timings while it is
scored, and the result (candidates, region, countries, verdict) it returns."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Verification's reference neighbours of one picture: their (lat, lon), their weights
#: (summing to 1) and each one's kernel width in km (places.neighbour_support).
Support = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class Candidate:
    lat: float
    lon: float
    probability: float
    score: float
    h3: str
    source: str
    country_code: str | None = None
    country: str | None = None
    admin1: str | None = None
    city: str | None = None
    #: Position in the LLM's reranking (1: its first choice) when it ranked this candidate.
    llm_rank: int | None = None
    #: False when the answer abstained (the picture is not one this model can locate).
    reliable: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LocateResult:
    candidates: list[Candidate]
    region: dict[str, Any] | None
    countries: list[dict[str, Any]]
    stages: list[str]
    timings_ms: dict[str, float]
    profile: str
    index: str
    extra: dict[str, Any] = field(default_factory=dict)
    #: The query's verified pool, for ``Locator.revise``; never serialised.
    draft: Scored | None = field(default=None, repr=False)
    #: The verdict ``{"score", "verdict", "reason", "abstained"}``
    #: (service/engine/localizability.py); None without a fitted model or for text queries.
    localizability: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "index": self.index,
            "candidates": [c.to_dict() for c in self.candidates],
            "region": self.region,
            "countries": self.countries,
            "stages": self.stages,
            "timings_ms": self.timings_ms,
            "localizability": self.localizability,
            **self.extra,
        }

    def add_time(self, stage: str, ms: float) -> None:
        if ms:
            self.timings_ms[stage] = round(self.timings_ms.get(stage, 0.0) + ms, 3)


@dataclass
class Pool:
    """Candidate points of one query, with cosine scores against it."""

    latlon: np.ndarray  # (n, 2)
    score: np.ndarray  # (n,) cosine with the query
    exact: np.ndarray  # (n,) bool: score computed with the GPS tower (not approximated)
    source: list[str]
    country: np.ndarray  # (n,) '<U2' or ""

    def extend(
        self,
        latlon: np.ndarray,
        score: np.ndarray,
        source: str,
        country: np.ndarray,
        exact: bool = True,
    ) -> None:
        self.latlon = np.concatenate([self.latlon, latlon])
        self.score = np.concatenate([self.score, score])
        self.exact = np.concatenate([self.exact, np.full(len(score), exact)])
        self.source += [source] * len(score)
        self.country = np.concatenate([self.country, country])

    def take(self, keep: np.ndarray) -> None:
        """Keep rows by index array (in that order) or boolean mask."""
        idx = np.flatnonzero(keep) if keep.dtype == bool else np.asarray(keep)
        self.latlon, self.score, self.exact = self.latlon[idx], self.score[idx], self.exact[idx]
        self.source = [self.source[i] for i in idx]
        self.country = self.country[idx]

    def copy(self) -> Pool:
        return Pool(
            self.latlon.copy(),
            self.score.copy(),
            self.exact.copy(),
            list(self.source),
            self.country.copy(),
        )


class Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def add(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.ms[stage] = round(self.ms.get(stage, 0.0) + (now - start) * 1000, 3)
        return now


@dataclass
class Scored:
    """One query after verification: its pool and logits, before the softmax."""

    pool: Pool
    logits: np.ndarray
    gallery_lse: float | None  # log-sum-exp over the gallery ("gallery" normalisation)
    stages: list[str]
    timer: Timer
    t: float  # when verification ended
    neighbours: list[dict[str, Any]]
    q: np.ndarray | None = None  # the query vector
    support: Support | None = None
    #: Unfiltered best gallery / reference cosines from retrieval, reused by the verdict.
    gallery_top: np.ndarray | None = None
    refs_top: np.ndarray | None = None
    verdict: dict[str, Any] | None = None
    #: Reference rows retrieval's unfiltered structure search found, reused by the verdict.
    refs_found: np.ndarray | None = None

    def copy(self) -> Scored:
        timer = Timer()
        timer.ms = dict(self.timer.ms)
        return Scored(
            self.pool.copy(),
            self.logits.copy(),
            self.gallery_lse,
            list(self.stages),
            timer,
            self.t,
            self.neighbours,
            self.q,
            self.support,
            self.gallery_top,
            self.refs_top,
            self.verdict,
            self.refs_found,
        )


def share_time(batch: list[Scored], stage: str, start: float, n: int) -> float:
    """Give each query of a batch its share (1/n) of a stage's time since ``start``."""
    now = time.perf_counter()
    ms = (now - start) * 1000 / n
    for s in batch:
        s.timer.ms[stage] = round(s.timer.ms.get(stage, 0.0) + ms, 3)
    return now
