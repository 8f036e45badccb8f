"""The locate pipeline: retrieve -> refine -> diversify -> verify -> judge -> describe.

Joins the encoders (image and GPS towers) and the index (gallery search, H3,
geocoding). No HTTP here: the CLI and the web service both call ``Locator.locate``.

``judge`` is the localizability verdict (service/engine/localizability.py), fitted with the
calibration: from the pictures' statistics and the shape of the answer it says whether this
model can locate the picture at all; below its threshold the answer abstains (candidates
flagged unreliable, no region, no country probabilities).

A result keeps its query's verified pool (``LocateResult.draft``), so ``Locator.revise`` can
finish the query again with extra candidate points (the LLM's proposals,
service/engine/llm_stages.py): they are scored by the GPS tower and verified like every other
candidate.

Longer than most modules: it is one class whose stages share a query's pool, the loaded
indexes and the model; what it works on is in results.py, the geometry of places in places.py.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from encoders import GeoModel, get_profile
from encoders.profiles import text_profiles
from encoders.structure import (
    COLOUR_DIM,
    STRUCTURE_DIM,
    PictureReading,
    colour_agreement,
    picture_descriptors,
    ramp_view,
    structure_similarity,
)
from index.geo import (
    int_to_cell,
    latlon_to_cells,
    mean_latlon,
    pairwise_km,
)
from index.geocode import ReverseGeocoder
from index.region import country_distribution, uncertainty_region
from index.store import LoadedIndex
from service.engine.album import AlbumConfig, AlbumResult, album_verdict, combine_regions
from service.engine.localizability import (
    GALLERY_K,
    NEIGHBOURS_K,
    LocalizabilityModel,
    answer_features,
    image_statistics_many,
)
from service.engine.options import LocateOptions
from service.engine.places import (
    Beam,
    lift_near_copy,
    logsumexp,
    merge_places,
    neighbour_kernels,
    neighbour_support,
    nms_owners,
)
from service.engine.results import (
    Candidate,
    LocateResult,
    Pool,
    Scored,
    Support,
    Timer,
    share_time,
)
from service.errors import InvalidOptionError, TextQueryUnsupportedError

if TYPE_CHECKING:
    from service.engine.calibration import Calibration

STAGES = ("retrieve", "refine", "diversify", "verify", "judge", "describe")
#: The finest H3 resolution refinement descends to (~0.1 km² cells).
MAX_REFINE_RES = 10
# A change to how candidates are scored below (these constants included) raises
# service.engine.options.SCORING, so that calibrations fitted before are fitted again.
#: Reference neighbours the structure and colour comparisons rank before ``neighbours`` are
#: kept.
STRUCTURE_POOL = 50
#: Reference images found by their structure alone (``LoadedIndex.search_structure``) that
#: join that shortlist; 0: the embedding's shortlist only.
STRUCTURE_SEARCH = 50
#: Reference images found by their colour thumbnails alone (``LoadedIndex.search_colour``)
#: that join it too; 0: none. Chosen on validation draws (docs/BENCHMARKS.md, "A colour
#: search").
COLOUR_SEARCH = 50
#: A picture in false colour is answered from its grey view where that answer's first place
#: is this many times as probable as the picture's own: switching on true-colour pictures that
#: happen to read as ramps gained nothing on validation draws, and 1.1 halves those switches
#: while the ramps keep their gain (docs/BENCHMARKS.md, "seen in grey").
GREY_VIEW_MARGIN = 1.1
#: The source (and stage) of a reference neighbour's place made first as a near copy of the
#: picture (LocateOptions.near_copy_colour, near_copy_km).
NEAR_COPY = "near_copy"
#: How much more probable than all other candidates together a near copy's place is made,
#: at temperature 1 and at the one stated: at 2, the mass its first place then states (about
#: 80-86 % with what merges into it) is near how often such places are right within 50 km on
#: validation draws (docs/BENCHMARKS.md, "Built: near copies").
NEAR_COPY_ODDS = 2.0


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
        if self.compares_structure and STRUCTURE_SEARCH:
            self.neighbours.structure_index()  # at load (and swap), not on the first request
        if self.compares_colour and COLOUR_SEARCH:
            self.neighbours.colour_index()

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
        return self.index.manifest.label

    @property
    def references_label(self) -> str | None:
        """The reference index as "name/version" (None: no image neighbours)."""
        return None if self.neighbours is None else self.neighbours.manifest.label

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
        return self._stores("structure", STRUCTURE_DIM)

    def _stores(self, field: str, dim: int) -> bool:
        """Whether the reference index holds rows ``field`` of ``dim`` per image."""
        stored = None if self.neighbours is None else getattr(self.neighbours.points, field)
        return stored is not None and stored.shape[1] == dim

    def wants_structure(self, options: LocateOptions) -> bool:
        """Whether a request with ``options`` compares the pictures' structure."""
        return self.compares_structure and options.structure_weight > 0 and options.neighbours > 0

    @property
    def compares_colour(self) -> bool:
        """Whether the reference index holds colour thumbnails of this release's kind."""
        return self._stores("colour", COLOUR_DIM)

    def wants_colour(self, options: LocateOptions) -> bool:
        """Whether a request with ``options`` compares the pictures' colours."""
        return self.compares_colour and options.colour_weight > 0 and options.neighbours > 0

    def needs_structure(self, options: LocateOptions) -> bool:
        """Whether a request's pictures need their descriptors: for verification, or for a
        verdict that weighs the best layout match among the reference images."""
        judged = self.judge is not None and self.judge.uses_refs
        return self.wants_structure(options) or (judged and self.compares_structure)

    def structure(self, images: Sequence[Image.Image]) -> np.ndarray | None:
        """The pictures' structure descriptors (None: nothing to compare them with)."""
        return self.read(images, with_views=False)[0]

    def read(
        self,
        images: Sequence[Image.Image],
        reading: PictureReading | None = None,
        *,
        with_views: bool = True,
    ) -> tuple[np.ndarray | None, np.ndarray | None, list[Image.Image | None]]:
        """The pictures' structure descriptors and colour thumbnails (None: nothing to compare
        them with) and, for pictures in false colour (read as a colour ramp), their views in
        grey along the ramp (``encoders.structure.ramp_view``; None for the others), each ramp
        of unsure direction drawn the way ``orient`` turned its layout (all None without
        ``with_views``: a caller that does not locate them). ``reading``: the pictures'
        ``picture_descriptors`` when the caller has them."""
        reading = picture_descriptors(images) if reading is None else reading
        structure = None
        turned = np.zeros(len(images), dtype=bool)
        if self.compares_structure:
            structure = self.orient(reading.descriptors, reading.unsure)
            turned = np.any(structure != reading.descriptors, axis=1)
        views = [
            None if ramp is None or not with_views else ramp_view(img, ramp, bool(t))
            for img, ramp, t in zip(images, reading.ramps, turned, strict=True)
        ]
        return structure, reading.colour if self.compares_colour else None, views

    def orient(self, structure: np.ndarray, unsure: np.ndarray) -> np.ndarray:
        """The descriptors, those of colour ramps of unsure direction (``unsure``) turned
        round where the reversed layout's best match among the references is the better one:
        a ramp whose luminance rises and falls has no dark end to start from. All references
        are searched, whatever a request's filters, as for the verdict's layout match."""
        if not unsure.any() or not self.compares_structure or not STRUCTURE_SEARCH:
            return structure
        assert self.neighbours is not None
        out = structure.copy()
        both = np.concatenate([structure[unsure], -structure[unsure]])
        best = self._best_structure(both, self.neighbours.search_structure(both, STRUCTURE_SEARCH))
        as_read, reversed_ = np.split(best, 2)
        rows = np.flatnonzero(unsure)[reversed_ > as_read]
        out[rows] = -structure[rows]
        return out

    def locate(self, images: Sequence[Image.Image], options: LocateOptions) -> list[LocateResult]:
        t0 = time.perf_counter()
        stats = self.image_features(images)
        stats_ms = (time.perf_counter() - t0) * 1000 / max(len(images), 1)
        t0 = time.perf_counter()
        structure, colour, views = self.read(images)
        structure = structure if self.needs_structure(options) else None
        structure_ms = (time.perf_counter() - t0) * 1000 / max(len(images), 1)
        results = self._locate_encoded(
            lambda: self.embed(images),
            len(images),
            options,
            image_stats=stats,
            structure=structure,
            views=views,
            colour=colour,
        )
        for r in results:
            if r.localizability is not None:
                r.add_time("judge", stats_ms)
            if structure is not None or colour is not None:
                r.add_time("retrieve", structure_ms)
        return results

    def locate_album(
        self,
        images: Sequence[Image.Image],
        options: LocateOptions,
        config: AlbumConfig | None = None,
    ) -> AlbumResult:
        """Several pictures of one place: each picture's own answer, and one joint answer.

        One pass of the image tower for all pictures, then the pipeline for each (retrieve,
        refine, verify, judge). Every picture's candidates are pooled, every pooled point is
        scored against every picture with verification's logits (one GPS-tower call for the
        pool), and service/engine/album.py ``combine`` weighs the pictures. Each picture's
        reference kernels are first widened by the album's spread (``config.spread_km``: its
        pictures need not show one spot), and the mean of the pooled places near the joint
        answer's first is scored as one more place. The joint answer is described like a
        single one (diversify, region, countries), with the album's verdict."""
        config = config or AlbumConfig()
        n = len(images)
        t0 = time.perf_counter()
        stats = self.image_features(images)
        t1 = time.perf_counter()
        structure, colour, views = self.read(images)
        structure = structure if self.needs_structure(options) else None
        t2 = time.perf_counter()
        queries = self.embed(images)
        t3 = time.perf_counter()
        temperature = self.temperature(options)
        batch = self._verified(queries, options, temperature, stats, structure, colour)
        self._prefer_views(batch, views, options, temperature, stats, structure)
        queries = np.stack([s.q for s in batch]) if batch else queries  # a grey view's own

        t = time.perf_counter()
        pooled = _pool_union([s.pool for s in batch])
        # Each picture's kernels widened by the album's spread and, for the regions' mass, by
        # the region's (album.py ``regional``).
        spreads = [config.spread_km]
        if config.regions:
            spreads.append(config.region_spread * config.spread_km)
        supports = [[_spread(s.support, km) for s in batch] for km in spreads]

        def score(latlon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Every picture's cosines (n, k) at the points, and its logits under each spread
            (len(spreads), n, k)."""
            with torch.inference_mode():
                gps = self.model.embed_gps(latlon.astype(np.float32))
            cos = queries.astype(np.float64) @ gps.T.astype(np.float64)
            logit = [
                [self._logits(latlon, c, sup, options) for c, sup in zip(cos, row, strict=True)]
                for row in supports
            ]  # per spread and picture, vectorised over the points
            return cos, np.array(logit)

        m = len(pooled.score)
        empty = (np.zeros((n, 0)), np.zeros((len(spreads), n, 0)))
        cosines, logits = score(pooled.latlon) if m else empty
        for i, s in enumerate(batch):  # a picture's near copy leads its own rows, as alone
            if (mine := near_copy_at(s.pool.source)) is not None:
                copy = s.pool.latlon[mine]
                at = int(np.argmin(np.abs(pooled.latlon - copy).sum(axis=1)))  # its place
                for row in logits[:, i]:
                    row[:] = lift_near_copy(row, at, NEAR_COPY_ODDS, temperature)
                pooled.source[at] = NEAR_COPY  # whichever picture's pool held it first
        prior = np.array([_prior_weight(s.verdict) for s in batch])
        combined = combine_regions(pooled.latlon, logits / temperature, prior, config)
        centre = _joint_centre(pooled.latlon, combined.logits, 2.0 * config.spread_km)
        if centre is not None and self._filter_points(centre, options).all():
            cos, logit = score(centre)
            wider = np.hstack([cosines, cos]), np.concatenate([logits, logit], axis=2)
            again = combine_regions(
                np.vstack([pooled.latlon, centre]), wider[1] / temperature, prior, config
            )
            # Kept only as the new first place: a point beside the first that does not beat it
            # would only add to the mass stated for that place.
            if int(np.argmax(again.logits)) == m:
                score_nan = np.full(1, np.nan)  # set below from the pictures' weights
                pooled.extend(centre, score_nan, "album", self.geocoder.country_codes(centre))
                (cosines, logits), combined = wider, again
        pooled.score = combined.weights @ cosines  # the pictures' weighted mean cosine
        timer = Timer()
        for stage in ("retrieve", "refine", "verify", "judge"):
            total = sum(s.timer.ms.get(stage, 0.0) for s in batch)
            if total:
                timer.ms[stage] = round(total, 3)
        # near_copy is the joint answer's own stage only where its first place is one (below).
        stages = [*dict.fromkeys(st for s in batch for st in s.stages if st != NEAR_COPY)]
        stages.append("combine")
        verdict = None
        if self.judge is not None:
            verdict = album_verdict(
                [s.verdict for s in batch], combined, self.judge.verdict, self.abstain_threshold
            )
        joint = Scored(
            pooled,
            combined.logits,
            None,
            stages,
            timer,
            timer.add("combine", t),
            [],
            None,
            None,
            verdict=verdict,
        )
        result = self._describe(joint, options, 1.0)
        if result.candidates and result.candidates[0].source == NEAR_COPY:
            result.stages.append(NEAR_COPY)
        singles = [self._describe(s, options, temperature) for s in batch]
        # The steps before the pipeline ran once for all pictures: each gets its share.
        steps = {"encode": t3 - t2, "judge": t1 - t0, "retrieve": t2 - t1}
        for target, share in [(result, 1.0), *((r, 1.0 / n) for r in singles)]:
            target.timings_ms = {
                "encode": round(steps["encode"] * 1000 * share, 3),
                **target.timings_ms,
            }
            if target.localizability is not None:
                target.add_time("judge", steps["judge"] * 1000 * share)
            target.add_time("retrieve", steps["retrieve"] * 1000 * share)
        result.draft = None  # a joint answer is not revised by the LLM stages
        return AlbumResult(
            joint=result,
            images=singles,
            weights=combined.weights,
            agreement=combined.agreement,
            outlier=combined.outlier,
            spread_km=config.spread_km,
        )

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
        views: Sequence[Image.Image | None] | None = None,
        colour: np.ndarray | None = None,
    ) -> list[LocateResult]:
        t0 = time.perf_counter()
        queries = encode()
        encode_ms = (time.perf_counter() - t0) * 1000 / max(n, 1)
        results = self.locate_embeddings(
            queries,
            options,
            image_stats=image_stats,
            structure=structure,
            views=views,
            colour=colour,
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
        views: Sequence[Image.Image | None] | None = None,
        colour: np.ndarray | None = None,
    ) -> list[LocateResult]:
        """The pipeline after the image tower, for (n, D) unit query vectors.

        ``image_stats``: the pictures' ``image_features`` (one row per query); with them and
        a fitted verdict every answer carries its localizability, else it is None.
        ``structure``: their ``structure`` descriptors and ``colour`` their colour
        thumbnails (``read``), which verification compares with the reference neighbours';
        None: not compared. ``views``: their grey views (``read``), located too where there
        is one.
        """
        temperature = self.temperature(options)
        batch = self._verified(queries, options, temperature, image_stats, structure, colour)
        if views is not None:
            self._prefer_views(batch, views, options, temperature, image_stats, structure)
        return [self._describe(scored, options, temperature) for scored in batch]

    def _prefer_views(
        self,
        batch: list[Scored],
        views: Sequence[Image.Image | None],
        options: LocateOptions,
        temperature: float,
        image_stats: np.ndarray | None,
        structure: np.ndarray | None,
    ) -> None:
        """A picture in false colour is located from its grey view as well (its colours say
        nothing the model learned; the layout of the quantity they draw does), and keeps the
        answer whose first place is the more probable (the picture's unless the view's is more
        than GREY_VIEW_MARGIN times as probable): the grey view where the ramp hides a
        true-colour look, the picture itself where its colours look like the ground's (an
        atlas's green-to-brown tints). In place; the answer keeps the picture's own stage
        times, and the second pass is timed as ``grey_view``."""
        rows = [i for i, view in enumerate(views) if view is not None]
        if not rows:
            return
        t0 = time.perf_counter()
        again = self._verified(
            self.embed([views[i] for i in rows]),
            options,
            temperature,
            None if image_stats is None else np.asarray(image_stats)[rows],  # the picture's own
            None if structure is None else structure[rows],
            # A grey view has no colours (the picture's are a ramp's): it gets no colour credit,
            # which tilts the choice below towards the picture only where its own colours
            # closely match a reference's, as a ramp's seldom do.
            None,
        )
        ms = (time.perf_counter() - t0) * 1000 / len(rows)
        for i, scored in zip(rows, again, strict=True):
            view = self._top_probability(scored, options, temperature)
            if view > GREY_VIEW_MARGIN * self._top_probability(batch[i], options, temperature):
                scored.stages.append("grey_view")
                scored.timer = batch[i].timer  # the first pass's times; the second is grey_view
                batch[i] = scored
            batch[i].timer.ms["grey_view"] = round(ms, 3)

    def _top_probability(self, scored: Scored, options: LocateOptions, temperature: float) -> float:
        """The probability the answer would state for its first place (its mass nearby); the
        first place alone, with no region, countries or place names."""
        lean = dataclasses.replace(options, top_k=1, describe=False)
        first = self._describe(scored.copy(), lean, temperature, with_region=False).candidates
        return first[0].probability if first else 0.0

    def _verified(
        self,
        queries: np.ndarray,
        options: LocateOptions,
        temperature: float,
        image_stats: np.ndarray | None,
        structure: np.ndarray | None,
        colour: np.ndarray | None = None,
    ) -> list[Scored]:
        """Each query scored (retrieve, refine, verify) and, with ``image_stats`` and a fitted
        verdict, judged; before the softmax and the description."""
        batch = self._score(queries, options, temperature, structure, colour)
        if image_stats is not None and self.judge is not None and batch:
            self._judge(batch, queries, np.asarray(image_stats), options, structure)
        return batch

    def judge_features(
        self,
        queries: np.ndarray,
        image_stats: np.ndarray,
        options: LocateOptions,
        structure: np.ndarray | None = None,
    ) -> np.ndarray:
        """The localizability features of pictures (image statistics, answer shape), as the
        verdict sees them when serving: what ``geoloc calibrate`` fits it on (with the
        reference index when there is one; ``structure``: the pictures' descriptors)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        known = [None] * len(queries)
        shape = self._answer_shape(queries, options, known, self.neighbours is not None, structure)
        return np.hstack([image_stats, answer_features(shape[0], self.scale, *shape[1:])])

    def picture_features(self, images: Sequence[Image.Image], options: LocateOptions) -> np.ndarray:
        """``judge_features`` of pictures read from scratch: embedded, measured and described
        here (the generated negatives ``geoloc calibrate`` fits the verdict against)."""
        return self.judge_features(
            self.embed(images), image_statistics_many(images), options, self.structure(images)
        )

    def _answer_shape(
        self,
        queries: np.ndarray,
        options: LocateOptions,
        known: Sequence[Scored | None],
        with_refs: bool,
        structure: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Each query's best GALLERY_K gallery and NEIGHBOURS_K reference cosines, and its
        best structure correlation among the references its structure search finds, without
        the request's filters (the verdict judges the picture, not the filter): taken from
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
        refs, best = None, None
        if with_refs and self.neighbours is not None:
            refs = fill([s.refs_top if s else None for s in known], self.neighbours, NEIGHBOURS_K)
            if structure is not None and self.compares_structure:
                found = [None if s is None else s.refs_found for s in known]
                todo = [i for i, f in enumerate(found) if f is None]
                if todo:
                    searched = self.neighbours.search_structure(structure[todo], STRUCTURE_SEARCH)
                    for row, i in enumerate(todo):
                        found[i] = searched[row]
                best = self._best_structure(structure, np.stack(found))
        return gallery, refs, best

    def _best_structure(self, structure: np.ndarray, found: np.ndarray) -> np.ndarray:
        """Each picture's best structure correlation among the reference rows ``found`` for
        it (rows of -1 are no result); 0 where none of them has a descriptor."""
        assert self.neighbours is not None
        best = np.zeros(len(structure))
        for i, rows in enumerate(found):
            described = np.asarray(self.neighbours.points.structure[rows[rows >= 0]])
            described = described[described.any(axis=1)]
            if len(described):
                best[i] = float(structure_similarity(structure[i], described).max())
        return best

    def _judge(
        self,
        batch: list[Scored],
        queries: np.ndarray,
        image_stats: np.ndarray,
        options: LocateOptions,
        structure: np.ndarray | None = None,
    ) -> None:
        assert self.judge is not None
        t = time.perf_counter()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with_refs = self.neighbours is not None and self.judge.uses_refs
        shape = self._answer_shape(queries, options, batch, with_refs, structure)
        features = np.hstack([image_stats, answer_features(shape[0], self.scale, *shape[1:])])
        for s, v in zip(batch, self.judge.judge(features, self.abstain_threshold), strict=True):
            s.verdict = v
            s.stages.append("judge")
        now = share_time(batch, "judge", t, len(batch))
        for s in batch:
            s.t = now

    def candidate_logits(
        self,
        queries: np.ndarray,
        options: LocateOptions,
        structure: np.ndarray | None = None,
        colour: np.ndarray | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray, int | None]]:
        """(latlon (n, 2), logits (n,), where its near copy is) of every candidate of each
        query, before the softmax and its temperature, a near copy lifted for temperature 1
        only: what calibration fits the temperature on (with the pictures' ``structure``
        descriptors and ``colour`` thumbnails, as served; ``lift_near_copy`` at each
        temperature tried). Candidate normalisation only."""
        scored = self._score(queries, options, 1.0, structure, colour)
        return [
            (s.pool.latlon.copy(), s.logits.copy(), near_copy_at(s.pool.source)) for s in scored
        ]

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
            # A near copy stays that much ahead of every candidate, the new ones included.
            scored.logits = _lift_copy(
                scored, np.concatenate([scored.logits, logits]), self.temperature(options)
            )
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
        colour: np.ndarray | None = None,
    ) -> list[Scored]:
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
        found: np.ndarray | None = None
        if not self.wants_structure(options):
            structure = None
        if not self.wants_colour(options):
            colour = None
        if self.neighbours is not None and options.neighbours > 0:
            nb_k = min(options.neighbours, len(self.neighbours))
            if structure is not None or colour is not None:  # ranked again in _retrieve
                nb_k = min(max(nb_k, STRUCTURE_POOL), len(self.neighbours))
            nb_allowed = self._allowed_rows(options, self.neighbours)
            nb = self.neighbours.search(
                queries, nb_k, allowed=nb_allowed, nprobe=nprobe, rerank_k=options.rerank_k
            )
            matches = []  # references found without the embedding
            if structure is not None and STRUCTURE_SEARCH:
                found = self.neighbours.search_structure(
                    structure, STRUCTURE_SEARCH, allowed=nb_allowed
                )
                matches.append(found)
            if colour is not None and COLOUR_SEARCH:
                matches.append(
                    self.neighbours.search_colour(colour, COLOUR_SEARCH, allowed=nb_allowed)
                )
            if matches:
                nb = self._add_matches(queries, np.hstack(matches), nb)
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
                None if colour is None else colour[i],
            )
            for i in range(len(queries))
        ]
        unfiltered = not (options.bbox or options.countries)
        for i, s in enumerate(batch):  # unfiltered: the verdict can reuse them
            s.refs_found = found[i] if found is not None and unfiltered else None
            if self.judge is not None and unfiltered:
                s.gallery_top = scores[i][:GALLERY_K]
                s.refs_top = None if nb is None else nb[0][i][:NEIGHBOURS_K]
        self._fill_scores(batch, [np.isnan(s.pool.score) for s in batch])  # neighbours
        for s in batch:
            s.pool.take(np.argsort(-s.pool.score, kind="stable"))
        t = share_time(batch, "retrieve", t, n)

        live = [s for s in batch if len(s.pool.score)]
        if options.refine and live:
            self._refine(live, options)
            for s in live:
                s.stages.append("refine")
            t = share_time(live, "refine", t, n)

        if options.verify and live:
            self._fill_scores(live, [~s.pool.exact for s in live])
            for s in live:
                s.stages.append("verify")
            t = share_time(live, "verify", t, n)

        for s in batch:
            logits = self._logits(s.pool.latlon, s.pool.score, s.support, options)
            s.logits = _lift_copy(s, logits, temperature)
            if NEAR_COPY in s.pool.source:
                s.stages.append(NEAR_COPY)
            s.t = t
        return batch

    def _add_matches(
        self, queries: np.ndarray, found: np.ndarray, nb: tuple[np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The embedding's reference shortlist ``nb`` (sims, rows), widened by ``found``
        (rows; -1: none), references found without the embedding: the STRUCTURE_SEARCH whose
        luminance layouts best match each picture's (under a colour change the embedding has
        not learnt, haze or a false-colour palette, the right reference keeps its layout but
        not its embedding), or the COLOUR_SEARCH nearest in colour (a picture whose codec or
        blur left its colours but not its texture). Their cosines come from the stored
        vectors; _retrieve ranks them all together."""
        assert self.neighbours is not None
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
        support: Support | None,
        opt: LocateOptions,
    ) -> np.ndarray:
        """Verification's logits: the image-GPS similarity, plus (when verifying) the log
        density of the image neighbours at each point."""
        logits = self.scale * score
        if opt.verify and support is not None and opt.neighbour_weight > 0 and len(logits):
            logits = logits + opt.neighbour_weight * neighbour_support(latlon, *support)
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
        colour: np.ndarray | None = None,
    ) -> Scored:
        """One query's starting pool: gallery hits, plus its image neighbours' points (score
        NaN until the batch's GPS-tower call). With the picture's ``structure`` descriptor
        and ``colour`` thumbnail, the neighbours are ranked by cosine +
        structure_weight·correlation + colour_weight·colour agreement first."""
        ok = rows >= 0
        rows, scores = rows[ok], scores[ok]
        pts = self.index.points
        pool = Pool(
            latlon=np.asarray(pts.latlon[rows], dtype=np.float64).reshape(-1, 2),
            score=scores.astype(np.float64),
            exact=np.full(len(rows), self.index.manifest.factory == "Flat"),
            source=["gallery"] * len(rows),
            country=np.asarray(pts.country[rows]),
        )
        neighbours: list[dict[str, Any]] = []
        support: Support | None = None
        if nb is not None:
            sims, nrows = nb[0][nb[1] >= 0], nb[1][nb[1] >= 0]
            keys, corr, agree = sims, None, None
            if structure is not None and len(nrows):
                described = np.asarray(self.neighbours.points.structure[nrows])  # one read
                corr = np.where(  # zero rows: never described
                    described.any(axis=1), structure_similarity(structure, described), np.nan
                )
                keys = keys + opt.structure_weight * np.nan_to_num(corr)
            if colour is not None and len(nrows):
                thumbs = np.asarray(self.neighbours.points.colour[nrows])  # zero rows: nan
                agree = colour_agreement(colour, thumbs, opt.colour_threshold)
                keys = keys + opt.colour_weight * np.nan_to_num(agree)
            if keys is not sims:  # ranked again: keep the best
                keep = np.argsort(-keys, kind="stable")[: opt.neighbours]
                sims, nrows, keys = sims[keep], nrows[keep], keys[keep]
                corr = None if corr is None else corr[keep]
                agree = None if agree is None else agree[keep]
            nlatlon = np.asarray(self.neighbours.points.latlon[nrows], dtype=np.float64)
            neighbours = [
                {"id": int(i), "lat": float(a), "lon": float(b), "similarity": float(sim)}
                for i, (a, b), sim in zip(
                    self.neighbours.points.ids[nrows], nlatlon, sims, strict=True
                )
            ]
            for name, values in (("structure", corr), ("colour", agree)):
                if values is not None:
                    for d, v in zip(neighbours, values, strict=True):
                        d[name] = round(float(v), 4) if np.isfinite(v) else None
            stored = self.neighbours.points.width
            width = None if stored is None else np.asarray(stored[nrows], dtype=np.float64)
            if width is not None:
                for d, w_km in zip(neighbours, width, strict=True):
                    d["width_km"] = round(float(w_km), 1) if np.isfinite(w_km) else None
            if len(nrows):
                w = np.exp(opt.neighbour_temperature * (keys - keys.max()))
                kernels = neighbour_kernels(
                    width, len(nrows), opt.neighbour_kernel_km, opt.neighbour_kernel_share
                )
                support = (nlatlon, w / w.sum(), kernels)
                # Their GPS joins the candidates, scored like any other point.
                first = len(pool.score)
                pool.extend(
                    nlatlon,
                    np.full(len(nlatlon), np.nan),
                    "neighbour",
                    np.asarray(self.neighbours.points.country[nrows]),
                    exact=False,
                )
                if _near_copy(agree, width, opt):
                    pool.source[first] = NEAR_COPY
        return Scored(
            pool, np.empty(0), gallery_lse, ["retrieve"], Timer(), 0.0, neighbours, q, support
        )

    def _fill_scores(self, batch: list[Scored], todo: list[np.ndarray]) -> None:
        """Score the ``todo`` points of each pool with the GPS tower, for the whole batch."""
        new = self._gps_scores_many(
            [s.q for s in batch], [s.pool.latlon[m] for s, m in zip(batch, todo, strict=True)]
        )
        for s, m, v in zip(batch, todo, new, strict=True):
            s.pool.score[m] = v
            s.pool.exact[m] = True

    def _describe(
        self, scored: Scored, opt: LocateOptions, temperature: float, with_region: bool = True
    ) -> LocateResult:
        """Softmax, uncertainty region and countries (``with_region``), diversify and describe
        one scored pool."""
        draft = scored.copy()  # before the pool is sorted and cut, for ``revise``
        pool, stages, timer, t = scored.pool, scored.stages, scored.timer, scored.t
        probs = _probabilities(scored, temperature)
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
        if len(probs) and not abstained and with_region:
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

    def _refine(self, batch: list[Scored], opt: LocateOptions) -> None:
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
        beams = [Beam.start(s.pool, opt.refine_beam, start_res, m.gallery_kind) for s in batch]
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
        return np.array([logsumexp(row) for row in all_scores])


def _prior_weight(verdict: dict[str, Any] | None) -> float:
    """A picture's weight in an album before agreement: its localizability score, 0 when its
    own answer abstains, 1 without a verdict."""
    if verdict is None:
        return 1.0
    return 0.0 if verdict["abstained"] else float(verdict["score"])


def _pool_union(pools: Sequence[Pool]) -> Pool:
    """The candidate points of several pools, each place once (the first pool's row)."""
    if not pools:
        return Pool(np.empty((0, 2)), np.empty(0), np.empty(0, bool), [], np.empty(0, "<U2"))
    latlon = np.concatenate([p.latlon for p in pools])
    _, first = np.unique(np.round(latlon, 6), axis=0, return_index=True)
    first = np.sort(first)
    source = [src for p in pools for src in p.source]
    return Pool(
        latlon=latlon[first],
        score=np.concatenate([p.score for p in pools])[first],
        exact=np.ones(len(first), dtype=bool),
        source=[source[i] for i in first],
        country=np.concatenate([p.country for p in pools])[first],
    )


def _probabilities(scored: Scored, temperature: float) -> np.ndarray:
    """The softmax of a scored pool at ``temperature``, in pool order."""
    logits = scored.logits / temperature
    if scored.gallery_lse is not None:
        # GeoCLIP's softmax over the whole gallery (plus any extra points found).
        extra = np.array(
            [s for s, src in zip(logits, scored.pool.source, strict=True) if src != "gallery"]
        )
        lse = scored.gallery_lse
        lse = np.logaddexp(lse, logsumexp(extra)) if len(extra) else lse
        return np.exp(logits - lse)
    return np.exp(logits - logsumexp(logits)) if len(logits) else logits


def _lift_copy(scored: Scored, logits: np.ndarray, temperature: float) -> np.ndarray:
    """``logits`` (of ``scored``'s pool) with its near copy's, where it has one, raised to
    NEAR_COPY_ODDS times all the others together at temperature 1 and at ``temperature``
    (``lift_near_copy``)."""
    at = near_copy_at(scored.pool.source)
    return logits if at is None else lift_near_copy(logits, at, NEAR_COPY_ODDS, temperature)


def near_copy_at(source: Sequence[str]) -> int | None:
    """Where a pool's near copy is (its index in ``source``), if it has one."""
    return source.index(NEAR_COPY) if NEAR_COPY in source else None


def _near_copy(agree: np.ndarray | None, width: np.ndarray | None, opt: LocateOptions) -> bool:
    """Whether the first ranked reference neighbour (colour agreement ``agree[0]``, view
    ``width[0]`` km wide) is a near copy of the picture; unknown colours or widths never are."""
    if agree is None or width is None or not len(agree) or opt.near_copy_km <= 0:
        return False
    if not opt.verify or opt.normalization != "candidates":  # no place is made first then
        return False
    a, w = float(agree[0]), float(width[0])
    return a >= opt.near_copy_colour and w <= opt.near_copy_km  # NaN compares False


def _spread(support: Support | None, spread_km: float) -> Support | None:
    """``support`` with each neighbour's kernel widened by ``spread_km`` (the two spreads
    added as independent Gaussian ones): an album's picture may show ground that far from the
    place the album shares."""
    if support is None or spread_km <= 0:
        return support
    latlon, weight, kernels = support
    return latlon, weight, np.sqrt(kernels**2 + spread_km**2)


def _joint_centre(latlon: np.ndarray, joint: np.ndarray, radius_km: float) -> np.ndarray | None:
    """(1, 2): the mean of the pooled points within ``radius_km`` of the joint answer's first,
    weighted by the joint probabilities. The pooled points lie near each picture's own place
    (or its references'), while an album's place lies among them; None where there is nothing
    to average (no radius, no other point that near, logits that are not finite)."""
    if radius_km <= 0 or len(joint) < 2:
        return None
    top = int(np.argmax(joint))
    near = pairwise_km(latlon[top : top + 1], latlon)[0] <= radius_km
    if near.sum() < 2:
        return None
    w = np.exp(joint[near] - joint[top])
    if not np.isfinite(w).all():
        return None
    return mean_latlon(latlon[near], w)[None, :]
