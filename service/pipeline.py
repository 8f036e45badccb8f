"""The locate pipeline: retrieve -> refine -> diversify -> verify -> judge -> describe.

Joins the encoders (image and GPS towers) and the index (gallery search, H3,
geocoding). No HTTP here: the CLI and the web service both call ``Locator.locate``.

``judge`` is the localizability verdict (service/localizability.py), fitted with the
calibration: from the pictures' statistics and the shape of the answer it says whether this
model can locate the picture at all; below its threshold the answer abstains (candidates
flagged unreliable, no region, no country probabilities).

A result keeps its query's verified pool (``LocateResult.draft``), so ``Locator.revise`` can
finish the query again with extra candidate points (the LLM's proposals, service/llm_stage.py):
they are scored by the GPS tower and verified like every other candidate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from encoders import GeoModel, get_profile
from encoders.profiles import text_profiles
from encoders.structure import STRUCTURE_DIM, structure_descriptors, structure_similarity
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
from service.errors import InvalidOptionError, TextQueryUnsupportedError
from service.localizability import (
    GALLERY_K,
    NEIGHBOURS_K,
    LocalizabilityModel,
    answer_features,
    image_statistics_many,
)

if TYPE_CHECKING:
    from service.calibration import Calibration

STAGES = ("retrieve", "refine", "diversify", "verify", "judge", "describe")
#: The finest H3 resolution refinement descends to (~0.1 km² cells).
MAX_REFINE_RES = 10
#: Reference neighbours the structure comparison ranks before ``neighbours`` are kept.
STRUCTURE_POOL = 50
#: Reference images found by their structure alone (``LoadedIndex.search_structure``) that
#: join that shortlist; 0: the embedding's shortlist only.
STRUCTURE_SEARCH = 50


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
    #: The neighbours are ranked and weighted by cosine + structure_weight·(rank correlation
    #: of the picture's luminance layout with theirs, ``encoders.structure``), among the
    #: STRUCTURE_POOL nearest by cosine and the STRUCTURE_SEARCH nearest by layout; 0 (or
    #: references without descriptors): cosine only. Chosen on validation draws
    #: (bench/tune.py --grid structure).
    structure_weight: float = 1.5
    #: The optional LLM stages (service/llm_stage.py): proposals that join the candidates,
    #: and a reranking among the returned candidates. Used only when an LLM is configured.
    llm_diversify: bool = True
    llm_rerank: bool = True
    #: Softmax temperature of verification (logits / temperature); None: the locator's
    #: calibration (``geoloc calibrate``), 1.0 without one.
    temperature: float | None = None
    #: IVF lists searched in a compressed index (gallery and reference images); 0: the
    #: index's own default, recorded in its manifest with the recall measured there.
    nprobe: int = 0
    #: Best candidates of a compressed index re-scored with its exact vectors (read from
    #: disk); None: the index's own depth (its manifest's ``rerank_k``), 0: off.
    rerank_k: int | None = None

    def validate(
        self,
        *,
        max_top_k: int,
        max_retrieve_k: int,
        max_nprobe: int = 1024,
        max_rerank_k: int = 2048,
    ) -> LocateOptions:
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
        check(
            0 <= self.nprobe <= max_nprobe,
            f"nprobe must be between 1 and {max_nprobe} (0: the index's own)",
        )
        check(
            self.rerank_k is None or 0 <= self.rerank_k <= max_rerank_k,
            f"rerank_k must be between 0 (off) and {max_rerank_k}",
        )
        check(0 <= self.neighbour_weight <= 10, "neighbour_weight must be between 0 and 10")
        check(1 <= self.neighbour_kernel_km <= 5000, "neighbour_kernel_km must be 1..5000")
        check(0 <= self.neighbour_temperature <= 1000, "neighbour_temperature must be 0..1000")
        check(0 <= self.structure_weight <= 10, "structure_weight must be between 0 and 10")
        check(
            self.temperature is None or 0.01 <= self.temperature <= 100,
            "temperature must be between 0.01 and 100",
        )
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
    draft: _Scored | None = field(default=None, repr=False)
    #: The verdict ``{"score", "verdict", "reason", "abstained"}`` (service/localizability.py);
    #: None without a fitted model or for text queries.
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

    def copy(self) -> _Pool:
        return _Pool(
            self.latlon.copy(),
            self.score.copy(),
            self.exact.copy(),
            list(self.source),
            self.country.copy(),
        )


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def add(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.ms[stage] = round(self.ms.get(stage, 0.0) + (now - start) * 1000, 3)
        return now


@dataclass
class _Scored:
    """One query after verification: its pool and logits, before the softmax."""

    pool: _Pool
    logits: np.ndarray
    gallery_lse: float | None  # log-sum-exp over the gallery ("gallery" normalisation)
    stages: list[str]
    timer: _Timer
    t: float  # when verification ended
    neighbours: list[dict[str, Any]]
    q: np.ndarray | None = None  # the query vector
    support: tuple[np.ndarray, np.ndarray] | None = None  # neighbour (latlon, weights)
    #: Unfiltered best gallery / reference cosines from retrieval, reused by the verdict.
    gallery_top: np.ndarray | None = None
    refs_top: np.ndarray | None = None
    verdict: dict[str, Any] | None = None

    def copy(self) -> _Scored:
        timer = _Timer()
        timer.ms = dict(self.timer.ms)
        return _Scored(
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
        )


class Locator:
    """Heavy parts loaded once (model, index, geocoder); ``locate`` per request."""

    def __init__(
        self,
        model: GeoModel,
        index: LoadedIndex,
        geocoder: ReverseGeocoder,
        neighbours: LoadedIndex | None = None,
        calibration: Calibration | None = None,
        abstain_below: float | None = None,
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
        self.calibration = calibration
        #: The localizability verdict fitted with the calibration (None: no verdicts).
        self.judge: LocalizabilityModel | None = (
            calibration.judge if calibration is not None else None
        )
        #: Answers whose localizability score is below this abstain; None: the fitted t_low.
        self.abstain_below = abstain_below

    @property
    def abstain_threshold(self) -> float | None:
        if self.judge is None:
            return None
        return self.judge.t_low if self.abstain_below is None else float(self.abstain_below)

    def temperature(self, options: LocateOptions) -> float:
        """The request's temperature, else the calibrated one, else 1."""
        if options.temperature is not None:
            return float(options.temperature)
        return self.calibration.temperature if self.calibration is not None else 1.0

    @property
    def index_label(self) -> str:
        return f"{self.index.manifest.name}/{self.index.manifest.version}"

    # -- entry points -------------------------------------------------------------------
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """One batch through the image tower -> (n, D) unit vectors."""
        return self.model.embed_images(list(images))

    def image_features(self, images: Sequence[Image.Image]) -> np.ndarray | None:
        """The image statistics of the localizability verdict (None: no verdict is fitted)."""
        return image_statistics_many(images) if self.judge is not None else None

    @property
    def compares_structure(self) -> bool:
        """Whether the reference index holds structure descriptors of this release's kind."""
        stored = None if self.neighbours is None else self.neighbours.points.structure
        return stored is not None and stored.shape[1] == STRUCTURE_DIM

    def wants_structure(self, options: LocateOptions) -> bool:
        """Whether a request with ``options`` compares the pictures' structure."""
        return self.compares_structure and options.structure_weight > 0 and options.neighbours > 0

    def structure(self, images: Sequence[Image.Image]) -> np.ndarray | None:
        """The pictures' structure descriptors (None: nothing to compare them with)."""
        return structure_descriptors(images) if self.compares_structure else None

    def locate(self, images: Sequence[Image.Image], options: LocateOptions) -> list[LocateResult]:
        t0 = time.perf_counter()
        stats = self.image_features(images)
        stats_ms = (time.perf_counter() - t0) * 1000 / max(len(images), 1)
        t0 = time.perf_counter()
        structure = self.structure(images) if self.wants_structure(options) else None
        structure_ms = (time.perf_counter() - t0) * 1000 / max(len(images), 1)
        results = self._locate_encoded(
            lambda: self.embed(images),
            len(images),
            options,
            image_stats=stats,
            structure=structure,
        )
        for r in results:
            if r.localizability is not None:
                r.add_time("judge", stats_ms)
            if structure is not None:
                r.add_time("retrieve", structure_ms)
        return results

    def locate_texts(self, texts: Sequence[str], options: LocateOptions) -> list[LocateResult]:
        """Text queries ("a beach in Brittany"): text tower -> image head -> the pipeline."""
        if not self.model.has_text:
            profile = get_profile(self.model.profile)
            why = (
                "its text tower is not loaded (the model was built without open_clip weights)"
                if profile.has_text
                else "it has no text tower"
            )
            raise TextQueryUnsupportedError(
                f"profile '{self.model.profile}' cannot locate text: {why}. Text queries need "
                f"a profile with a text tower: {', '.join(text_profiles()) or 'none'}"
            )
        return self._locate_encoded(
            lambda: self.model.embed_texts(list(texts)), len(texts), options
        )

    def _locate_encoded(
        self,
        encode: Callable[[], np.ndarray],
        n: int,
        options: LocateOptions,
        image_stats: np.ndarray | None = None,
        structure: np.ndarray | None = None,
    ) -> list[LocateResult]:
        t0 = time.perf_counter()
        queries = encode()
        encode_ms = (time.perf_counter() - t0) * 1000 / max(n, 1)
        results = self.locate_embeddings(
            queries, options, image_stats=image_stats, structure=structure
        )
        for r in results:
            r.timings_ms = {"encode": round(encode_ms, 3), **r.timings_ms}
        return results

    def locate_embeddings(
        self,
        queries: np.ndarray,
        options: LocateOptions,
        image_stats: np.ndarray | None = None,
        structure: np.ndarray | None = None,
    ) -> list[LocateResult]:
        """The pipeline after the image tower, for (n, D) unit query vectors.

        ``image_stats``: the pictures' ``image_features`` (one row per query); with them and
        a fitted verdict every answer carries its localizability, else it is None.
        ``structure``: their ``structure`` descriptors, which verification compares with the
        reference neighbours'; None: cosine only.
        """
        temperature = self.temperature(options)
        batch = self._score(queries, options, temperature, structure)
        if image_stats is not None and self.judge is not None and batch:
            self._judge(batch, queries, np.asarray(image_stats), options)
        return [self._describe(scored, options, temperature) for scored in batch]

    def judge_features(
        self, queries: np.ndarray, image_stats: np.ndarray, options: LocateOptions
    ) -> np.ndarray:
        """The localizability features of pictures (image statistics, answer shape), as the
        verdict sees them when serving: what ``geoloc calibrate`` fits it on (with the
        reference index when there is one)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        known = [None] * len(queries)
        gallery, refs = self._answer_shape(queries, options, known, self.neighbours is not None)
        return np.hstack([image_stats, answer_features(gallery, self.scale, refs)])

    def _answer_shape(
        self,
        queries: np.ndarray,
        options: LocateOptions,
        known: Sequence[_Scored | None],
        with_refs: bool,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Each query's best GALLERY_K gallery and NEIGHBOURS_K reference cosines, without the
        request's filters (the verdict judges the picture, not the filter): taken from
        retrieval where it searched deep enough unfiltered, else searched here."""
        nprobe = options.nprobe or None

        def fill(got: list[np.ndarray | None], index: LoadedIndex, k: int) -> np.ndarray:
            need = min(k, len(index))  # a small index holds fewer than k
            todo = [i for i, g in enumerate(got) if g is None or len(g) < need]
            if todo:
                sims, _ = index.search(
                    queries[todo], min(k, len(index)), nprobe=nprobe, rerank_k=options.rerank_k
                )
                for row, i in enumerate(todo):
                    got[i] = sims[row]
            out = np.full((len(got), k), np.nan)
            for i, g in enumerate(got):
                g = np.asarray(g, dtype=np.float64)[:k]
                out[i, : len(g)] = g
            return out

        gallery = fill([s.gallery_top if s else None for s in known], self.index, GALLERY_K)
        refs = None
        if with_refs and self.neighbours is not None:
            refs = fill([s.refs_top if s else None for s in known], self.neighbours, NEIGHBOURS_K)
        return gallery, refs

    def _judge(
        self,
        batch: list[_Scored],
        queries: np.ndarray,
        image_stats: np.ndarray,
        options: LocateOptions,
    ) -> None:
        assert self.judge is not None
        t = time.perf_counter()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        gallery, refs = self._answer_shape(
            queries, options, batch, self.neighbours is not None and self.judge.uses_refs
        )
        features = np.hstack([image_stats, answer_features(gallery, self.scale, refs)])
        for s, v in zip(batch, self.judge.judge(features, self.abstain_threshold), strict=True):
            s.verdict = v
            s.stages.append("judge")
        now = _share(batch, "judge", t, len(batch))
        for s in batch:
            s.t = now

    def candidate_logits(
        self, queries: np.ndarray, options: LocateOptions, structure: np.ndarray | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(latlon (n, 2), logits (n,)) of every candidate of each query, before the softmax
        and its temperature: what calibration fits the temperature on (with the pictures'
        ``structure`` descriptors, as served). Candidate normalisation only."""
        scored = self._score(queries, options, 1.0, structure)
        return [(s.pool.latlon.copy(), s.logits.copy()) for s in scored]

    def revise(
        self, result: LocateResult, points: np.ndarray, options: LocateOptions, source: str
    ) -> LocateResult:
        """Finish ``result``'s query again with extra candidate points.

        The points are scored by the GPS tower (plus the neighbours' support, as in
        verification) and then go through the softmax, suppression and description like
        every other candidate, so they win only if the image and the place agree. Remove
        points outside the request's filters first (``allowed``).
        """
        if result.draft is None:
            raise ValueError("this result keeps no draft to revise")
        scored = result.draft.copy()
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if len(pts) and scored.q is not None:
            t = time.perf_counter()
            score = self._gps_scores(scored.q, pts)
            logits = self._logits(pts, score, scored.support, options)
            scored.pool.extend(pts, score, source, self.geocoder.country_codes(pts))
            scored.logits = np.concatenate([scored.logits, logits])
            scored.timer.add("verify", t)
        scored.t = time.perf_counter()
        return self._describe(scored, options, self.temperature(options))

    def allowed(self, latlon: np.ndarray, options: LocateOptions) -> np.ndarray:
        """Which points pass the request's filters (bbox, countries): a boolean mask."""
        return self._filter_points(np.asarray(latlon, dtype=np.float64).reshape(-1, 2), options)

    def _score(
        self,
        queries: np.ndarray,
        options: LocateOptions,
        temperature: float,
        structure: np.ndarray | None = None,
    ) -> list[_Scored]:
        """Retrieve, refine and verify a batch: each query's pool and logits (before softmax).

        Every stage runs for the whole batch at once, with one GPS-tower call per stage and
        refinement level instead of one per query; each query's timings get its share.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = max(len(queries), 1)
        allowed = self._allowed_rows(options)
        k = min(options.retrieve_k, len(self.index))
        t = time.perf_counter()
        nprobe = options.nprobe or None
        scores, rows = self.index.search(
            queries, k, allowed=allowed, nprobe=nprobe, rerank_k=options.rerank_k
        )
        nb: tuple[np.ndarray, np.ndarray] | None = None
        if not self.wants_structure(options):
            structure = None
        if self.neighbours is not None and options.neighbours > 0:
            nb_k = min(options.neighbours, len(self.neighbours))
            if structure is not None:  # a deeper shortlist, ranked again in _retrieve
                nb_k = min(max(nb_k, STRUCTURE_POOL), len(self.neighbours))
            nb_allowed = self._allowed_rows(options, self.neighbours)
            nb = self.neighbours.search(
                queries, nb_k, allowed=nb_allowed, nprobe=nprobe, rerank_k=options.rerank_k
            )
            if structure is not None and STRUCTURE_SEARCH:
                nb = self._add_structure_matches(queries, structure, nb, nb_allowed)
        gallery_lse = (
            self._gallery_logsumexp(queries, allowed, temperature)
            if options.normalization == "gallery"
            else None
        )
        batch = [
            self._retrieve(
                queries[i],
                scores[i],
                rows[i],
                options,
                None if gallery_lse is None else float(gallery_lse[i]),
                None if nb is None else (nb[0][i], nb[1][i]),
                None if structure is None else structure[i],
            )
            for i in range(len(queries))
        ]
        if self.judge is not None and not (options.bbox or options.countries):
            for i, s in enumerate(batch):  # unfiltered: the verdict can reuse them
                s.gallery_top = scores[i][:GALLERY_K]
                s.refs_top = None if nb is None else nb[0][i][:NEIGHBOURS_K]
        self._fill_scores(batch, [np.isnan(s.pool.score) for s in batch])  # neighbours
        for s in batch:
            s.pool.take(np.argsort(-s.pool.score, kind="stable"))
        t = _share(batch, "retrieve", t, n)

        live = [s for s in batch if len(s.pool.score)]
        if options.refine and live:
            self._refine(live, options)
            for s in live:
                s.stages.append("refine")
            t = _share(live, "refine", t, n)

        if options.verify and live:
            self._fill_scores(live, [~s.pool.exact for s in live])
            for s in live:
                s.stages.append("verify")
            t = _share(live, "verify", t, n)

        for s in batch:
            s.logits = self._logits(s.pool.latlon, s.pool.score, s.support, options)
            s.t = t
        return batch

    def _add_structure_matches(
        self,
        queries: np.ndarray,
        structure: np.ndarray,
        nb: tuple[np.ndarray, np.ndarray],
        allowed: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The embedding's reference shortlist ``nb`` (sims, rows), widened by the
        STRUCTURE_SEARCH references whose luminance layouts best match each picture's, found
        without the embedding: under a colour change the embedding has not learnt (haze, a
        false-colour palette) the right reference keeps its layout but not its embedding.
        Their cosines come from the stored vectors; _retrieve ranks them all together."""
        assert self.neighbours is not None
        found = self.neighbours.search_structure(structure, STRUCTURE_SEARCH, allowed=allowed)
        sims, rows = [], []
        for i, (s_i, r_i) in enumerate(zip(*nb, strict=True)):
            new = np.setdiff1d(found[i][found[i] >= 0], r_i)
            sims.append(np.concatenate([s_i, self.neighbours.vectors(new) @ queries[i]]))
            rows.append(np.concatenate([r_i, new]))
        width = max(len(r) for r in rows)
        out_s = np.full((len(rows), width), -np.inf, dtype=np.float32)
        out_r = np.full((len(rows), width), -1, dtype=np.int64)
        for i, (s_i, r_i) in enumerate(zip(sims, rows, strict=True)):
            out_s[i, : len(s_i)], out_r[i, : len(r_i)] = s_i, r_i
        return out_s, out_r

    def _logits(
        self,
        latlon: np.ndarray,
        score: np.ndarray,
        support: tuple[np.ndarray, np.ndarray] | None,
        opt: LocateOptions,
    ) -> np.ndarray:
        """Verification's logits: the image-GPS similarity, plus (when verifying) the log
        density of the image neighbours at each point."""
        logits = self.scale * score
        if opt.verify and support is not None and opt.neighbour_weight > 0 and len(logits):
            logits = logits + opt.neighbour_weight * _neighbour_support(
                latlon, *support, opt.neighbour_kernel_km
            )
        return logits

    # -- stages -------------------------------------------------------------------------
    def _retrieve(
        self,
        q: np.ndarray,
        scores: np.ndarray,
        rows: np.ndarray,
        opt: LocateOptions,
        gallery_lse: float | None,
        nb: tuple[np.ndarray, np.ndarray] | None,
        structure: np.ndarray | None = None,
    ) -> _Scored:
        """One query's starting pool: gallery hits, plus its image neighbours' points (score
        NaN until the batch's GPS-tower call). With the picture's ``structure`` descriptor,
        the neighbours are ranked by cosine + structure_weight·correlation first."""
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
        neighbours: list[dict[str, Any]] = []
        support: tuple[np.ndarray, np.ndarray] | None = None  # neighbour (latlon, weights)
        if nb is not None:
            sims, nrows = nb[0][nb[1] >= 0], nb[1][nb[1] >= 0]
            keys, corr, known = sims, None, np.zeros(0, dtype=bool)
            if structure is not None and len(nrows):
                described = np.asarray(self.neighbours.points.structure[nrows])  # one read
                corr = structure_similarity(structure, described)
                keys = sims + opt.structure_weight * corr
                keep = np.argsort(-keys, kind="stable")[: opt.neighbours]
                sims, nrows, corr, keys = sims[keep], nrows[keep], corr[keep], keys[keep]
                known = described[keep].any(axis=1)  # zero rows: never described
            nlatlon = np.asarray(self.neighbours.points.latlon[nrows], dtype=np.float64)
            neighbours = [
                {"id": int(i), "lat": float(a), "lon": float(b), "similarity": float(sim)}
                for i, (a, b), sim in zip(
                    self.neighbours.points.ids[nrows], nlatlon, sims, strict=True
                )
            ]
            if corr is not None:
                for d, c, k in zip(neighbours, corr, known, strict=True):
                    d["structure"] = round(float(c), 4) if k else None
            if len(nrows):
                w = np.exp(opt.neighbour_temperature * (keys - keys.max()))
                support = (nlatlon, w / w.sum())
                # Their GPS joins the candidates, scored like any other point.
                pool.extend(
                    nlatlon,
                    np.full(len(nlatlon), np.nan),
                    "neighbour",
                    np.asarray(self.neighbours.points.country[nrows]),
                    exact=False,
                )
        return _Scored(
            pool, np.empty(0), gallery_lse, ["retrieve"], _Timer(), 0.0, neighbours, q, support
        )

    def _fill_scores(self, batch: list[_Scored], todo: list[np.ndarray]) -> None:
        """Score the ``todo`` points of each pool with the GPS tower, for the whole batch."""
        new = self._gps_scores_many(
            [s.q for s in batch], [s.pool.latlon[m] for s, m in zip(batch, todo, strict=True)]
        )
        for s, m, v in zip(batch, todo, new, strict=True):
            s.pool.score[m] = v
            s.pool.exact[m] = True

    def _describe(self, scored: _Scored, opt: LocateOptions, temperature: float) -> LocateResult:
        """Softmax, uncertainty region, diversify and describe one scored pool."""
        draft = scored.copy()  # before the pool is sorted and cut, for ``revise``
        pool, stages, timer, t = scored.pool, scored.stages, scored.timer, scored.t
        logits = scored.logits / temperature
        if scored.gallery_lse is not None:
            # GeoCLIP's softmax over the whole gallery (plus any extra points found).
            extra = np.array(
                [s for s, src in zip(logits, pool.source, strict=True) if src != "gallery"]
            )
            lse = scored.gallery_lse
            lse = np.logaddexp(lse, _logsumexp(extra)) if len(extra) else lse
            probs = np.exp(logits - lse)
        else:
            probs = np.exp(logits - _logsumexp(logits)) if len(logits) else logits
        order = np.argsort(-probs, kind="stable")
        pool.take(order)
        probs = probs[order]
        # Places are ranked by the mass at temperature 1: a temperature (calibration) changes
        # the probabilities stated, never which places come first.
        rank_by = probs
        if temperature != 1.0 and len(probs):
            rank_by = np.exp(scored.logits[order] - scored.logits.max())

        # Region and countries use the whole pool distribution, before suppression. An answer
        # that abstains states neither: they would present it as confident.
        verdict = dict(scored.verdict) if scored.verdict is not None else None
        abstained = verdict is not None and verdict["abstained"]
        region = None
        country_probs: list[dict[str, Any]] = []
        if len(probs) and not abstained:
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
            keep, keep_probs = merge_places(nms_owners(pool.latlon, opt.nms_km), probs, rank_by)
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
                reliable=not abstained,
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
            extra["neighbours"] = scored.neighbours
        return LocateResult(
            extra=extra,
            candidates=cands,
            region=region,
            countries=country_probs,
            stages=stages,
            timings_ms=timer.ms,
            profile=self.model.profile,
            index=self.index_label,
            draft=draft,
            localizability=verdict,
        )

    def _refine(self, batch: list[_Scored], opt: LocateOptions) -> None:
        """Descend the H3 hierarchy under each query's best start cells, scoring children
        on the fly (one GPS-tower call per level for the whole batch).

        Each start cell keeps ``refine_width`` children per level; the best leaf found
        under each start cell joins its pool.
        """
        m = self.index.manifest
        start_res = m.h3_resolution if m.gallery_kind == "h3" else opt.refine_start_res
        if start_res is None:
            start_res = opt.refine_start_res
        levels = min(opt.refine_levels, MAX_REFINE_RES - start_res)
        if levels <= 0:
            return
        beams = [_Beam.start(s.pool, opt.refine_beam, start_res, m.gallery_kind) for s in batch]
        for level in range(1, levels + 1):
            res = start_res + level
            for beam in beams:
                beam.expand(res, lambda latlon: self._filter_points(latlon, opt))
            scores = self._gps_scores_many([s.q for s in batch], [b.latlon[b.todo] for b in beams])
            for beam, s in zip(beams, scores, strict=True):
                beam.keep(s, opt.refine_width)
        for s, beam in zip(batch, beams, strict=True):
            found = np.isfinite(beam.best_score)
            if found.any():
                pts = beam.best_latlon[found]
                s.pool.extend(
                    pts, beam.best_score[found], "refined", self.geocoder.country_codes(pts)
                )

    # -- helpers ------------------------------------------------------------------------
    def _gps_scores(self, q: np.ndarray, latlon: np.ndarray) -> np.ndarray:
        return self._gps_scores_many([q], [latlon])[0]

    def _gps_scores_many(
        self, queries: Sequence[np.ndarray], latlons: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """Cosine of each query with its own points, in one GPS-tower call for all."""
        sizes = [len(p) for p in latlons]
        if not sum(sizes):
            return [np.empty(0) for _ in sizes]
        with torch.inference_mode():
            emb = self.model.embed_gps(np.concatenate(latlons).astype(np.float32))
        parts = np.split(emb, np.cumsum(sizes)[:-1])
        return [part @ q for part, q in zip(parts, queries, strict=True)]

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

    def _gallery_logsumexp(
        self, queries: np.ndarray, allowed: np.ndarray | None, temperature: float
    ) -> np.ndarray:
        all_scores = self.index.all_scores(queries) * (self.scale / temperature)
        if allowed is not None:
            all_scores = np.where(allowed[None, :], all_scores, -np.inf)
        return np.array([_logsumexp(row) for row in all_scores])


def text_query(text: str, max_chars: int) -> str:
    """A text query, stripped; empty or longer than ``max_chars`` is an invalid option."""
    text = text.strip()
    if not text:
        raise InvalidOptionError("the text query is empty")
    if len(text) > max_chars:
        raise InvalidOptionError(
            f"the text query has {len(text)} characters; the limit is {max_chars} "
            "(GEOLOC_MAX_TEXT_CHARS)"
        )
    return text


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


def _share(batch: list[_Scored], stage: str, start: float, n: int) -> float:
    """Give each query of a batch its share (1/n) of a stage's time since ``start``."""
    now = time.perf_counter()
    ms = (now - start) * 1000 / n
    for s in batch:
        s.timer.ms[stage] = round(s.timer.ms.get(stage, 0.0) + ms, 3)
    return now


@dataclass
class _Beam:
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
    def start(cls, pool: _Pool, beam: int, res: int, gallery_kind: str) -> _Beam:
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
        parent, children = cell_children(self.cells, res)
        score = np.full(len(children), np.nan)
        centre = children == cell_center_children(self.cells, res)[parent]
        score[centre] = self.known[parent[centre]]
        latlon = cells_to_latlon(children)
        ok = allowed(latlon)
        self.children, self.child_owner = children[ok], self.owner[parent][ok]
        self.latlon, self.score = latlon[ok], score[ok]
        self.todo = np.isnan(self.score)

    def keep(self, new_scores: np.ndarray, width: int) -> None:
        """Take the scores of ``todo``; keep the best ``width`` children per start cell."""
        self.score[self.todo] = new_scores
        keep = _top_per_group(self.child_owner, self.score, width)
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
