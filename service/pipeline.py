"""The locate pipeline: retrieve -> refine -> diversify -> verify -> describe.

Joins the encoders (image and GPS towers) and the index (gallery search, H3,
geocoding). No HTTP here: the CLI and the web service both call ``Locator.locate``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from encoders import GeoModel
from index.geo import (
    BBox,
    cell_center_children,
    cell_children,
    cells_to_latlon,
    int_to_cell,
    latlon_to_cells,
    pairwise_km,
)
from index.geocode import ReverseGeocoder
from index.region import country_distribution, uncertainty_region
from index.store import LoadedIndex
from service.errors import InvalidOptionError

STAGES = ("retrieve", "refine", "diversify", "verify", "describe")
#: The finest H3 resolution refinement descends to (~0.1 km² cells).
MAX_REFINE_RES = 10


@dataclass(frozen=True)
class LocateOptions:
    """Per-request knobs. Defaults come from Settings; limits are checked in ``validate``."""

    top_k: int = 5
    retrieve_k: int = 128
    refine: bool = True
    diversify: bool = True
    verify: bool = True
    describe: bool = True
    #: Start cells to descend from, beam width under each, and levels below the gallery res.
    refine_beam: int = 5
    refine_width: int = 2
    refine_levels: int = 3
    #: Resolution at which CSV-gallery points enter the H3 hierarchy for refinement.
    refine_start_res: int = 4
    #: Candidates closer than this to a better one are merged into it.
    nms_km: float = 50.0
    region_share: float = 0.9
    region_res: int = 3
    #: "candidates": softmax over the candidate set; "gallery": over the whole gallery
    #: (GeoCLIP's normalisation, for comparison).
    normalization: str = "candidates"
    bbox: BBox | None = None
    countries: tuple[str, ...] = ()
    #: Reference images to retrieve (G3's Geo-alignment); 0 turns the stage part off.
    neighbours: int = 10
    return_neighbours: bool = False
    #: Verification adds weight·log(kernel density of the neighbours) to each logit;
    #: neighbours are weighted by softmax(temperature·image similarity).
    neighbour_weight: float = 1.0
    neighbour_kernel_km: float = 50.0
    neighbour_temperature: float = 50.0

    def validate(self, *, max_top_k: int, max_retrieve_k: int) -> LocateOptions:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise InvalidOptionError(msg)

        check(1 <= self.top_k <= max_top_k, f"top_k must be between 1 and {max_top_k}")
        check(
            self.top_k <= self.retrieve_k <= max_retrieve_k,
            f"retrieve_k must be between top_k ({self.top_k}) and {max_retrieve_k}",
        )
        check(1 <= self.refine_beam <= 64, "refine_beam must be between 1 and 64")
        check(1 <= self.refine_width <= 8, "refine_width must be between 1 and 8")
        check(0 <= self.refine_levels <= 6, "refine_levels must be between 0 and 6")
        check(0 <= self.refine_start_res <= 8, "refine_start_res must be between 0 and 8")
        check(0 <= self.nms_km <= 5000 and np.isfinite(self.nms_km), "nms_km must be 0..5000")
        check(0 < self.region_share <= 1, "region_share must be in (0, 1]")
        check(0 <= self.region_res <= 8, "region_res must be between 0 and 8")
        check(0 <= self.neighbours <= 256, "neighbours must be between 0 and 256")
        check(0 <= self.neighbour_weight <= 10, "neighbour_weight must be between 0 and 10")
        check(1 <= self.neighbour_kernel_km <= 5000, "neighbour_kernel_km must be 1..5000")
        check(0 <= self.neighbour_temperature <= 1000, "neighbour_temperature must be 0..1000")
        check(
            self.normalization in ("candidates", "gallery"),
            "normalization must be 'candidates' or 'gallery'",
        )
        for c in self.countries:
            check(len(c) == 2 and c.isalpha(), f"country '{c}' is not an ISO 3166 alpha-2 code")
        return self


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "index": self.index,
            "candidates": [c.to_dict() for c in self.candidates],
            "region": self.region,
            "countries": self.countries,
            "stages": self.stages,
            "timings_ms": self.timings_ms,
            **self.extra,
        }


@dataclass
class _Pool:
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


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def add(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.ms[stage] = round(self.ms.get(stage, 0.0) + (now - start) * 1000, 3)
        return now


class Locator:
    """Heavy parts loaded once (model, index, geocoder); ``locate`` per request."""

    def __init__(
        self,
        model: GeoModel,
        index: LoadedIndex,
        geocoder: ReverseGeocoder,
        neighbours: LoadedIndex | None = None,
    ) -> None:
        if index.manifest.profile != model.profile or index.manifest.dim != model.embed_dim:
            raise InvalidOptionError(
                f"index {index.manifest.name}/{index.manifest.version} was built for profile "
                f"'{index.manifest.profile}' (dim {index.manifest.dim}), the model is "
                f"'{model.profile}' (dim {model.embed_dim}): build an index for this profile"
            )
        if neighbours is not None and (
            neighbours.manifest.profile != model.profile
            or neighbours.manifest.dim != model.embed_dim
        ):
            raise InvalidOptionError(
                f"reference index {neighbours.manifest.name} was built for profile "
                f"'{neighbours.manifest.profile}'; embed the references with '{model.profile}'"
            )
        self.model = model
        self.index = index
        self.neighbours = neighbours
        self.geocoder = geocoder
        self.scale = model.scale

    @property
    def index_label(self) -> str:
        return f"{self.index.manifest.name}/{self.index.manifest.version}"

    # -- entry points -------------------------------------------------------------------
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """One batch through the image tower -> (n, D) unit vectors."""
        return self.model.embed_images(list(images))

    def locate(self, images: Sequence[Image.Image], options: LocateOptions) -> list[LocateResult]:
        t0 = time.perf_counter()
        queries = self.embed(images)
        encode_ms = (time.perf_counter() - t0) * 1000 / max(len(images), 1)
        results = self.locate_embeddings(queries, options)
        for r in results:
            r.timings_ms = {"encode": round(encode_ms, 3), **r.timings_ms}
        return results

    def locate_embeddings(self, queries: np.ndarray, options: LocateOptions) -> list[LocateResult]:
        """The pipeline after the image tower, for (n, D) unit query vectors."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        allowed = self._allowed_rows(options)
        k = min(options.retrieve_k, len(self.index))
        timer_start = time.perf_counter()
        scores, rows = self.index.search(queries, k, allowed=allowed)
        nb: tuple[np.ndarray, np.ndarray] | None = None
        if self.neighbours is not None and options.neighbours > 0:
            nb_k = min(options.neighbours, len(self.neighbours))
            nb = self.neighbours.search(
                queries, nb_k, allowed=self._allowed_rows(options, self.neighbours)
            )
        search_ms = (time.perf_counter() - timer_start) * 1000 / max(len(queries), 1)
        gallery_lse = (
            self._gallery_logsumexp(queries, allowed)
            if options.normalization == "gallery"
            else None
        )
        return [
            self._locate_one(
                queries[i],
                scores[i],
                rows[i],
                options,
                search_ms,
                None if gallery_lse is None else float(gallery_lse[i]),
                None if nb is None else (nb[0][i], nb[1][i]),
            )
            for i in range(len(queries))
        ]

    # -- stages -------------------------------------------------------------------------
    def _locate_one(
        self,
        q: np.ndarray,
        scores: np.ndarray,
        rows: np.ndarray,
        opt: LocateOptions,
        search_ms: float,
        gallery_lse: float | None,
        nb: tuple[np.ndarray, np.ndarray] | None,
    ) -> LocateResult:
        timer = _Timer()
        timer.ms["retrieve"] = round(search_ms, 3)
        t = time.perf_counter()
        ok = rows >= 0
        rows, scores = rows[ok], scores[ok]
        pts = self.index.points
        pool = _Pool(
            latlon=np.asarray(pts.latlon[rows], dtype=np.float64).reshape(-1, 2),
            score=scores.astype(np.float64),
            exact=np.full(len(rows), self.index.manifest.factory == "Flat"),
            source=["gallery"] * len(rows),
            country=np.asarray(pts.country[rows]),
        )
        stages = ["retrieve"]
        neighbours: list[dict[str, Any]] = []
        support: tuple[np.ndarray, np.ndarray] | None = None  # neighbour (latlon, weights)
        if nb is not None:
            sims, nrows = nb[0][nb[1] >= 0], nb[1][nb[1] >= 0]
            nlatlon = np.asarray(self.neighbours.points.latlon[nrows], dtype=np.float64)
            neighbours = [
                {"id": int(i), "lat": float(a), "lon": float(b), "similarity": float(sim)}
                for i, (a, b), sim in zip(
                    self.neighbours.points.ids[nrows], nlatlon, sims, strict=True
                )
            ]
            if len(nrows):
                w = np.exp(opt.neighbour_temperature * (sims - sims.max()))
                support = (nlatlon, w / w.sum())
                # Their GPS joins the candidates, scored like any other point.
                pool.extend(
                    nlatlon,
                    self._gps_scores(q, nlatlon),
                    "neighbour",
                    np.asarray(self.neighbours.points.country[nrows]),
                )
            order = np.argsort(-pool.score, kind="stable")
            pool.take(order)
        t = timer.add("retrieve", t)

        if opt.refine and len(pool.score):
            self._refine(q, pool, opt)
            stages.append("refine")
            t = timer.add("refine", t)

        if opt.verify and len(pool.score):
            todo = ~pool.exact
            if todo.any():
                pool.score[todo] = self._gps_scores(q, pool.latlon[todo])
                pool.exact[todo] = True
            stages.append("verify")
            t = timer.add("verify", t)

        logits = self.scale * pool.score
        if opt.verify and support is not None and opt.neighbour_weight > 0 and len(logits):
            logits = logits + opt.neighbour_weight * _neighbour_support(
                pool.latlon, *support, opt.neighbour_kernel_km
            )
        if gallery_lse is not None:
            # GeoCLIP's softmax over the whole gallery (plus any extra points found).
            extra = np.array(
                [s for s, src in zip(logits, pool.source, strict=True) if src != "gallery"]
            )
            lse = np.logaddexp(gallery_lse, _logsumexp(extra)) if len(extra) else gallery_lse
            probs = np.exp(logits - lse)
        else:
            probs = np.exp(logits - _logsumexp(logits)) if len(logits) else logits
        order = np.argsort(-probs, kind="stable")
        pool.take(order)
        probs = probs[order]

        # Region and countries use the whole pool distribution, before suppression.
        region = None
        country_probs: list[dict[str, Any]] = []
        if len(probs):
            reg = uncertainty_region(pool.latlon, probs, res=opt.region_res, share=opt.region_share)
            region = {
                "share": reg.share,
                "covered": reg.covered,
                "area_km2": reg.area_km2,
                "h3_resolution": opt.region_res,
                "cells": reg.cells,
                "geojson": reg.geojson,
            }
            country_probs = [
                {"country_code": c or None, "probability": p}
                for c, p in country_distribution(pool.country, probs)
            ]

        keep_probs = probs
        if opt.diversify and len(probs):
            keep, keep_probs = _suppress(pool.latlon, probs, opt.nms_km)
            # A place that absorbed many neighbours can now outrank a lone peak.
            by_mass = np.argsort(-keep_probs, kind="stable")
            keep, keep_probs = keep[by_mass], keep_probs[by_mass]
            pool.take(keep)
            stages.append("diversify")
            t = timer.add("diversify", t)

        n = min(opt.top_k, len(pool.score))
        cells = latlon_to_cells(pool.latlon[:n], MAX_REFINE_RES) if n else np.array([], np.int64)
        cands = [
            Candidate(
                lat=float(pool.latlon[i, 0]),
                lon=float(pool.latlon[i, 1]),
                probability=float(keep_probs[i]),
                score=float(pool.score[i]),
                h3=int_to_cell(int(cells[i])),
                source=pool.source[i],
            )
            for i in range(n)
        ]
        if opt.describe and cands:
            for c, place in zip(cands, self.geocoder.lookup(pool.latlon[:n]), strict=True):
                c.country_code, c.country = place.country_code, place.country
                c.admin1, c.city = place.admin1, place.city
            stages.append("describe")
            timer.add("describe", t)
        extra: dict[str, Any] = {}
        if opt.return_neighbours:
            extra["neighbours"] = neighbours
        return LocateResult(
            extra=extra,
            candidates=cands,
            region=region,
            countries=country_probs,
            stages=stages,
            timings_ms=timer.ms,
            profile=self.model.profile,
            index=self.index_label,
        )

    def _refine(self, q: np.ndarray, pool: _Pool, opt: LocateOptions) -> None:
        """Descend the H3 hierarchy under the best start cells, scoring children on the fly.

        Each start cell keeps ``refine_width`` children per level; the best leaf found
        under each start cell joins the pool.
        """
        m = self.index.manifest
        start_res = m.h3_resolution if m.gallery_kind == "h3" else opt.refine_start_res
        if start_res is None:
            start_res = opt.refine_start_res
        levels = min(opt.refine_levels, MAX_REFINE_RES - start_res)
        if levels <= 0:
            return
        beam_idx = np.arange(min(opt.refine_beam, len(pool.score)))
        cells = latlon_to_cells(pool.latlon[beam_idx], start_res)
        owner = beam_idx.copy()  # which start cell each frontier cell descends from
        # Scores of the frontier cells' centres where known: an H3 gallery point is its
        # cell's centre, and a centre child shares its parent's centre, so one GPS-tower
        # call in seven is saved.
        known = np.full(len(cells), np.nan)
        if m.gallery_kind == "h3":
            from_gallery = np.array([pool.source[i] == "gallery" for i in beam_idx], dtype=bool)
            known[from_gallery] = pool.score[beam_idx][from_gallery]
        best_score = np.full(len(beam_idx), -np.inf)
        best_latlon = np.zeros((len(beam_idx), 2))
        for level in range(1, levels + 1):
            res = start_res + level
            parent, children = cell_children(cells, res)
            s = np.full(len(children), np.nan)
            centre = children == cell_center_children(cells, res)[parent]
            s[centre] = known[parent[centre]]
            child_owner = owner[parent]
            latlon = cells_to_latlon(children)
            ok = self._filter_points(latlon, opt)
            children, child_owner, latlon, s = children[ok], child_owner[ok], latlon[ok], s[ok]
            if not len(children):
                break
            todo = np.isnan(s)
            s[todo] = self._gps_scores(q, latlon[todo])
            keep = _top_per_group(child_owner, s, opt.refine_width)
            for j in keep:
                o = child_owner[j]
                if s[j] > best_score[o]:
                    best_score[o], best_latlon[o] = s[j], latlon[j]
            cells, owner, known = children[keep], child_owner[keep], s[keep]
        found = np.isfinite(best_score)
        if found.any():
            pts = best_latlon[found]
            pool.extend(pts, best_score[found], "refined", self.geocoder.country_codes(pts))

    # -- helpers ------------------------------------------------------------------------
    def _gps_scores(self, q: np.ndarray, latlon: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            emb = self.model.embed_gps(latlon.astype(np.float32))
        return emb @ q

    def _allowed_rows(
        self, opt: LocateOptions, index: LoadedIndex | None = None
    ) -> np.ndarray | None:
        if opt.bbox is None and not opt.countries:
            return None
        index = index or self.index
        pts = index.points
        mask = np.ones(len(index), dtype=bool)
        if opt.bbox is not None:
            mask &= opt.bbox.contains(np.asarray(pts.latlon))
        if opt.countries:
            mask &= np.isin(np.asarray(pts.country), [c.upper() for c in opt.countries])
        return mask

    def _filter_points(self, latlon: np.ndarray, opt: LocateOptions) -> np.ndarray:
        ok = np.ones(len(latlon), dtype=bool)
        if opt.bbox is not None:
            ok &= opt.bbox.contains(latlon)
        if opt.countries and ok.any():
            codes = self.geocoder.country_codes(latlon[ok])
            ok[ok] = np.isin(codes, [c.upper() for c in opt.countries])
        return ok

    def _gallery_logsumexp(self, queries: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        all_scores = self.index.all_scores(queries) * self.scale
        if allowed is not None:
            all_scores = np.where(allowed[None, :], all_scores, -np.inf)
        return np.array([_logsumexp(row) for row in all_scores])


def _neighbour_support(
    latlon: np.ndarray, nb_latlon: np.ndarray, nb_weight: np.ndarray, kernel_km: float
) -> np.ndarray:
    """log of a Gaussian kernel density of the reference neighbours at each candidate.

    Each neighbour is weighted by the softmax of its image similarity, so a close
    look-alike pulls the verdict towards its location; the floor keeps candidates far
    from every neighbour possible rather than impossible.
    """
    d = pairwise_km(latlon, nb_latlon)
    density = (nb_weight[None, :] * np.exp(-0.5 * (d / kernel_km) ** 2)).sum(axis=1)
    return np.log(1e-3 + density)


def _logsumexp(x: np.ndarray) -> float:
    if not len(x):
        return -np.inf
    m = float(np.max(x))
    return m + float(np.log(np.sum(np.exp(x - m))))


def _top_per_group(group: np.ndarray, score: np.ndarray, width: int) -> np.ndarray:
    """Indices of the ``width`` best scores within each group."""
    order = np.lexsort((-score, group))
    g = group[order]
    first = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
    return order[rank < width]


def _suppress(
    latlon: np.ndarray, probs: np.ndarray, radius_km: float
) -> tuple[np.ndarray, np.ndarray]:
    """Spatial NMS over points sorted by probability (descending).

    Returns the kept indices and their probabilities with the mass of every suppressed
    point added to the kept point that suppressed it, so "this place" means the area.
    """
    n = len(probs)
    if radius_km <= 0 or n == 0:
        return np.arange(n), probs
    dist = pairwise_km(latlon, latlon)
    owner = np.full(n, -1)
    for i in range(n):
        if owner[i] >= 0:
            continue
        owner[i] = i
        near = (dist[i] <= radius_km) & (owner < 0)
        owner[near] = i
    keep = np.flatnonzero(owner == np.arange(n))
    mass = np.bincount(owner, weights=probs, minlength=n)
    return keep, mass[keep]
