"""The geometry of candidate places: neighbour support, spatial NMS and merging, the refinement
beam over the H3 hierarchy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from index.geo import (
    cell_to_center_child,
    cell_to_children,
    cells_to_latlon,
    latlon_to_cells,
    pairwise_km,
)

if TYPE_CHECKING:
    from service.engine.results import Pool


def neighbour_support(
    latlon: np.ndarray, nb_latlon: np.ndarray, nb_weight: np.ndarray, kernel_km: np.ndarray
) -> np.ndarray:
    """log of a Gaussian kernel density of the reference neighbours at each candidate.

    Each neighbour is weighted by the softmax of its image similarity, so a close
    look-alike pulls the verdict towards its location; ``kernel_km`` (per neighbour) says
    how precisely each one places it. The floor keeps candidates far from every neighbour
    possible rather than impossible.
    """
    d = pairwise_km(latlon, nb_latlon)
    density = (nb_weight[None, :] * np.exp(-0.5 * (d / kernel_km[None, :]) ** 2)).sum(axis=1)
    return np.log(1e-3 + density)


def neighbour_kernels(
    width_km: np.ndarray | None, n: int, kernel_km: float, share: float
) -> np.ndarray:
    """Each neighbour's kernel: ``kernel_km``, or ``share`` of the ground its image shows
    where that is known and narrower (a narrow view places its match more precisely)."""
    out = np.full(n, float(kernel_km))
    if width_km is not None and share > 0:
        known = np.isfinite(width_km)
        out[known] = np.clip(share * width_km[known], 1.0, kernel_km)
    return out


def lift_near_copy(
    logits: np.ndarray, at: int, odds: float, temperature: float = 1.0
) -> np.ndarray:
    """``logits`` with the one at ``at`` raised (never lowered) so that, in the softmax of
    logits / t, that point alone holds at least odds / (1 + odds) of the mass both at t = 1
    (where places are ranked: its place comes first whatever the others merge into) and at
    t = ``temperature`` (the probabilities stated)."""
    if len(logits) < 2:
        return logits
    others = np.delete(logits, at)
    t, log_odds = float(temperature), float(np.log(odds))
    out = logits.copy()
    out[at] = max(
        float(logits[at]),
        logsumexp(others) + log_odds,
        t * (logsumexp(others / t) + log_odds),
    )
    return out


def logsumexp(x: np.ndarray) -> float:
    if not len(x):
        return -np.inf
    m = float(np.max(x))
    return m + float(np.log(np.sum(np.exp(x - m))))


def top_per_group(group: np.ndarray, score: np.ndarray, width: int) -> np.ndarray:
    """Indices of the ``width`` best scores within each group."""
    order = np.lexsort((-score, group))
    g = group[order]
    first = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
    return order[rank < width]


@dataclass
class Beam:
    """One query's H3 refinement: the frontier cells, the start cell each descends from,
    and the best leaf found so far under each start cell."""

    cells: np.ndarray
    owner: np.ndarray
    known: np.ndarray  # the frontier cells' centre scores where known, else NaN
    best_score: np.ndarray
    best_latlon: np.ndarray
    # The level being scored: children of the frontier, their start cell, centre, score.
    children: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    child_owner: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    latlon: np.ndarray = field(default_factory=lambda: np.empty((0, 2)))
    score: np.ndarray = field(default_factory=lambda: np.empty(0))
    todo: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))

    @classmethod
    def start(cls, pool: Pool, beam: int, res: int, gallery_kind: str) -> Beam:
        idx = np.arange(min(beam, len(pool.score)))
        # An H3 gallery point is its cell's centre, and a centre child shares its parent's
        # centre: its score is known, which saves one GPS-tower call in seven.
        known = np.full(len(idx), np.nan)
        if gallery_kind == "h3":
            from_gallery = np.array([pool.source[i] == "gallery" for i in idx], dtype=bool)
            known[from_gallery] = pool.score[idx][from_gallery]
        return cls(
            cells=latlon_to_cells(pool.latlon[idx], res),
            owner=idx.copy(),
            known=known,
            best_score=np.full(len(idx), -np.inf),
            best_latlon=np.zeros((len(idx), 2)),
        )

    def expand(self, res: int, allowed: Callable[[np.ndarray], np.ndarray]) -> None:
        """The children at ``res`` that pass the filters; ``todo`` marks those to score."""
        if not len(self.cells):
            self.children, self.latlon, self.todo = self.cells, np.empty((0, 2)), self.todo[:0]
            self.child_owner, self.score = self.owner, np.empty(0)
            return
        parent, children = cell_to_children(self.cells, res)
        score = np.full(len(children), np.nan)
        centre = children == cell_to_center_child(self.cells, res)[parent]
        score[centre] = self.known[parent[centre]]
        latlon = cells_to_latlon(children)
        ok = allowed(latlon)
        self.children, self.child_owner = children[ok], self.owner[parent][ok]
        self.latlon, self.score = latlon[ok], score[ok]
        self.todo = np.isnan(self.score)

    def keep(self, new_scores: np.ndarray, width: int) -> None:
        """Take the scores of ``todo``; keep the best ``width`` children per start cell."""
        self.score[self.todo] = new_scores
        keep = top_per_group(self.child_owner, self.score, width)
        for j in keep:
            o = self.child_owner[j]
            if self.score[j] > self.best_score[o]:
                self.best_score[o], self.best_latlon[o] = self.score[j], self.latlon[j]
        self.cells, self.owner, self.known = (
            self.children[keep],
            self.child_owner[keep],
            self.score[keep],
        )


def nms_owners(latlon: np.ndarray, radius_km: float) -> np.ndarray:
    """Spatial NMS over points sorted by probability (descending): for each point, the
    index of the kept point it is merged into (itself when kept).

    Depends only on the order of the probabilities, so it holds for any softmax temperature.
    """
    n = len(latlon)
    if radius_km <= 0 or n == 0:
        return np.arange(n)
    dist = pairwise_km(latlon, latlon)
    owner = np.full(n, -1)
    for i in range(n):
        if owner[i] >= 0:
            continue
        owner[i] = i
        near = (dist[i] <= radius_km) & (owner < 0)
        owner[near] = i
    return owner


def merge_places(
    owner: np.ndarray, probs: np.ndarray, rank_by: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The kept points and their probabilities with the mass of every point merged into
    them added (so "this place" means the area), ordered by the merged mass of ``rank_by``
    (default ``probs``), most probable first."""
    n = len(probs)
    keep = np.flatnonzero(owner == np.arange(n))
    mass = np.bincount(owner, weights=probs, minlength=n)[keep]
    rank = mass if rank_by is None else np.bincount(owner, weights=rank_by, minlength=n)[keep]
    # A place that absorbed many neighbours can now outrank a lone peak.
    by_mass = np.argsort(-rank, kind="stable")
    return keep[by_mass], mass[by_mass]
