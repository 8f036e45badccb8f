"""Request and response bodies of the HTTP API (pydantic). No logic beyond shape and bounds."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.api.problems import Problem
from service.engine.llm_stages import LLMReport
from service.engine.options import MAX_SPREAD_KM, SPREAD_DOC

_STRICT_FLOATS = ConfigDict(allow_inf_nan=False)
ISO2 = r"^[A-Za-z]{2}$"
BBOX = r"^\s*[-+]?[0-9.]+\s*(,\s*[-+]?[0-9.]+\s*){3}$"
Iso2 = Annotated[str, StringConstraints(pattern=ISO2)]


class LocateRequestOptions(BaseModel):
    """Per-request options; unset ones take the service defaults (GEOLOC_* settings).

    Ranges that depend on the service's settings (top_k <= GEOLOC_MAX_TOP_K, bbox order) are
    checked after parsing and answered with an `invalid-option` problem.
    """

    model_config = _STRICT_FLOATS

    top_k: int | None = Field(None, ge=1, description="Candidates to return.")
    refine: bool | None = Field(None, description="Descend the H3 hierarchy (coarse to fine).")
    diversify: bool | None = Field(None, description="Spatial NMS: keep distinct places.")
    verify: bool | None = Field(None, description="Score every candidate with the GPS tower.")
    region_share: float | None = Field(
        None, gt=0, le=1, description="Probability mass the uncertainty region holds."
    )
    bbox: str | None = Field(
        None,
        pattern=BBOX,
        description="Search only inside 'south,west,north,east' (degrees; west > east "
        "crosses the antimeridian).",
        examples=["35,-10,60,30"],
    )
    countries: list[Iso2] | None = Field(
        None, max_length=300, description="Search only in these ISO 3166 alpha-2 countries."
    )
    neighbours: int | None = Field(
        None, ge=0, le=256, description="Reference images to retrieve (0: none)."
    )
    return_neighbours: bool | None = Field(
        None, description="Include the retrieved reference images in the answer."
    )
    nprobe: int | None = Field(
        None,
        ge=1,
        description="IVF lists searched in a compressed index (more: better recall, slower); "
        "at most GEOLOC_MAX_NPROBE. Default: the index's own.",
    )
    rerank_k: int | None = Field(
        None,
        ge=0,
        description="Best candidates of a compressed index re-scored with its exact vectors "
        "(more: better recall, slower); 0: off; at most GEOLOC_MAX_RERANK_K. Default: the "
        "index's own.",
    )
    llm_diversify: bool | None = Field(
        None, description="Ask the LLM (when one is configured) for extra candidates."
    )
    llm_rerank: bool | None = Field(
        None, description="Let the LLM (when one is configured) rerank the candidates."
    )


class LocateJSONRequest(LocateRequestOptions):
    """JSON form of /v1/locate: the image as base64 (a data: URL prefix is accepted)."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    image_base64: str = Field(..., description="The image bytes, base64-encoded.")


class TextLocateRequest(LocateRequestOptions):
    """POST /v1/locate/text: a description of a place, for profiles with a text tower."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    text: str = Field(
        ...,
        min_length=1,
        description="What the place looks like, e.g. 'a sandy beach with palm trees'. At most "
        "GEOLOC_MAX_TEXT_CHARS characters.",
    )


class LocateBodyOptions(LocateRequestOptions):
    """The options as a JSON object inside a body: unknown keys are refused, as at the top."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")


class UrlLocateRequest(BaseModel):
    """POST /v1/locate/url: an image to fetch (when GEOLOC_URL_FETCH_ENABLED) and locate."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    url: str = Field(..., min_length=1, max_length=2048, description="http(s) URL of the image.")
    options: LocateBodyOptions | None = Field(
        None, description="The locate options (as the query parameters of /v1/locate)."
    )


# -- examples of the answers (tests/service/api/test_openapi_docs.py validates each) ------------

_INDEX_VERSION = "default-bluemarble/20260131-120000-000000"
_PREDICTION_ID = "c322b8c0a06c414db6ca4a06cc2f674c"
_LIBYA = {
    "country_code": "LY",
    "country": "Libyan Arab Jamahiriya",
    "admin1": "Ghāt",
    "city": "Al Barakāt",
}


def _candidate(lat: float, lon: float, p: float, score: float, h3: str) -> dict[str, Any]:
    return {"lat": lat, "lon": lon, "probability": p, "score": score, "h3": h3}


def _cell(h3: str, value: float, ring: list[list[float]]) -> dict[str, Any]:
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
        "properties": {"h3": h3, "value": value},
    }


#: A satellite tile of the Sahara (23.0 N, 12.0 E) located by the bundled bluemarble model.
LOCATE_EXAMPLE: dict[str, Any] = {
    "prediction_id": _PREDICTION_ID,
    "profile": "bluemarble",
    "purpose": "satellite views of the Earth's surface (not ground photos)",
    "index_version": _INDEX_VERSION,
    "candidates": [
        {
            **_candidate(24.175, 11.277, 0.58, 0.711, "8a596c100007fff"),
            "source": "refined",
            **_LIBYA,
            "llm_rank": None,
            "reliable": True,
        },
        {
            **_candidate(24.289, 10.644, 0.27, 0.704, "8a5961a40007fff"),
            "source": "refined",
            **_LIBYA,
            "llm_rank": None,
            "reliable": True,
        },
        {
            **_candidate(21.632, 11.965, 0.06, 0.696, "8a594c900007fff"),
            "source": "gallery",
            "country_code": "NE",
            "country": "Niger",
            "admin1": "Agadez",
            "city": "Bilma",
            "llm_rank": None,
            "reliable": True,
        },
    ],
    "region": {
        "share": 0.9,
        "covered": 0.93,
        "area_km2": 28048.6,
        "h3_resolution": 3,
        "cells": ["83596cfffffffff", "835961fffffffff"],
        "geojson": {
            "type": "FeatureCollection",
            "features": [
                _cell(
                    "83596cfffffffff",
                    0.62,
                    [
                        [10.73, 24.341],
                        [10.777, 23.676],
                        [11.418, 23.37],
                        [12.019, 23.727],
                        [11.98, 24.395],
                        [11.332, 24.703],
                    ],
                ),
                _cell(
                    "835961fffffffff",
                    0.31,
                    [
                        [9.49, 24.278],
                        [9.544, 23.616],
                        [10.184, 23.316],
                        [10.777, 23.676],
                        [10.73, 24.341],
                        [10.083, 24.643],
                    ],
                ),
            ],
        },
    },
    "countries": [
        {"country_code": "LY", "probability": 0.86},
        {"country_code": "NE", "probability": 0.08},
        {"country_code": "DZ", "probability": 0.05},
        {"country_code": None, "probability": 0.01},
    ],
    "stages": ["retrieve", "refine", "verify", "judge", "diversify", "describe"],
    "timings_ms": {
        "queue": 5.96,
        "encode": 33.7,
        "retrieve": 0.58,
        "refine": 26.3,
        "verify": 0.03,
        "judge": 1.08,
        "diversify": 6.67,
        "describe": 0.41,
    },
    "localizability": {
        "score": 0.93,
        "verdict": "located",
        "reason": "like the satellite views of the Earth's surface this model knows",
        "abstained": False,
    },
    "neighbours": None,
    "llm": {
        "status": "skipped",
        "reason": "no LLM is configured (GEOLOC_LLM_BASE_URL is empty)",
        "model": None,
        "calls": 0,
        "attempts": 0,
        "answered": 0,
        "errors": {},
        "elapsed_ms": 0.0,
        "diversify": None,
        "rerank": None,
    },
    "warnings": [],
}


def _examples(*examples: dict[str, Any]) -> ConfigDict:
    """``model_config`` of a response model: its examples in the OpenAPI document."""
    return ConfigDict(json_schema_extra={"examples": list(examples)})


# -- the locate answer ---------------------------------------------------------------------------


class CandidateOut(BaseModel):
    """A place the picture may show, most probable first."""

    lat: float = Field(description="Latitude of the place, degrees (WGS84).", examples=[24.175])
    lon: float = Field(description="Longitude of the place, degrees (WGS84).", examples=[11.277])
    probability: float = Field(
        description="Probability that the true location lies within GEOLOC_CALIBRATION_KM "
        "(default 50 km) of this candidate: its share of the softmax of the verification logits "
        "over every scored point, plus, when diversify ran, the mass of the points within "
        "nms_km (default 50 km) that were merged into it. The temperature fitted by `geoloc "
        "calibrate` makes the top-1 probability calibrated for that event (/v1/info "
        "`calibration.within_km` names it; /v1/stats measures its calibration error); "
        "without a calibration it is the raw softmax (temperature 1). Candidates are ranked "
        "by it; it is meaningless when `reliable` is false.",
        examples=[0.58],
    )
    score: float = Field(
        description="Cosine similarity of the image embedding and the GPS tower's embedding "
        "of this point, in [-1, 1]: the evidence verification turns into a logit "
        "(logit_scale × score, plus the support of reference-image neighbours). Comparable "
        "within one answer, not a probability.",
        examples=[0.711],
    )
    h3: str = Field(
        description="H3 cell (resolution 10, about 0.015 km²) of the point.",
        examples=["8a596c100007fff"],
    )
    source: str = Field(
        description="Where the point came from: gallery (the index), refined (an H3 child "
        "found by refinement), neighbour (a reference image's location), near_copy (the "
        "location of a narrow reference view whose colours closely match the picture's, made "
        "first: GEOLOC_NEAR_COPY_COLOUR, GEOLOC_NEAR_COPY_KM), llm (an LLM proposal) or album "
        "(an album's "
        "joint answer: the mean of its pooled places near its first).",
        examples=["refined"],
    )
    country_code: str | None = Field(
        None,
        description="ISO 3166 alpha-2 code of the country (offline reverse geocoding); null "
        "at sea or when describe is off.",
        examples=["NE"],
    )
    country: str | None = Field(None, description="Country name; null at sea.", examples=["Niger"])
    admin1: str | None = Field(
        None, description="First-level administrative area (state, region).", examples=["Agadez"]
    )
    city: str | None = Field(
        None, description="Nearest populated place in the geocoder's table.", examples=["Bilma"]
    )
    llm_rank: int | None = Field(
        None, description="Position in the LLM's reranking (1: its first choice), if ranked."
    )
    reliable: bool = Field(
        True,
        description="False when the answer abstained (localizability below the abstain "
        "threshold): the point is the model's best guess, not a location to rely on.",
    )


class LocalizabilityOut(BaseModel):
    """Whether this model can locate this picture at all (fitted by `geoloc calibrate`)."""

    score: float = Field(
        ge=0,
        le=1,
        description="How much the picture is like those the model can locate: the mean of "
        "the fitted localizability classifiers (one per fold), in [0, 1] (1: like the held-out "
        "in-domain "
        "pictures; 0: like the generated non-domain ones). /v1/info `localizability` gives "
        "its thresholds t_low and t_high.",
        examples=[0.93],
    )
    verdict: Literal["located", "uncertain", "not_locatable"] = Field(
        description="not_locatable below the fitted t_low (the model cannot locate such "
        "pictures), located from t_high (like the pictures it knows), else uncertain (like "
        "them, but less so than most: trust the answer less).",
        examples=["located"],
    )
    reason: str = Field(
        description="Why, in words: what sets the picture apart from those the model knows "
        "(e.g. 'it has the straight edges of text or buildings').",
        examples=["like the satellite views of the Earth's surface this model knows"],
    )
    abstained: bool = Field(
        description="The score is below the abstain threshold (GEOLOC_ABSTAIN_BELOW, default "
        "t_low): every candidate is unreliable, no country probabilities, no region."
    )


class RegionOut(BaseModel):
    """Where the probability mass is: the fewest H3 cells, most probable first, whose summed
    candidate mass reaches ``share``."""

    share: float = Field(
        description="The probability mass asked for (the region_share option, default 0.9): "
        "the region holds at least this share of the mass of all scored points.",
        examples=[0.9],
    )
    covered: float = Field(
        description="The mass the cells hold (>= share: the last cell overshoots).",
        examples=[0.93],
    )
    area_km2: float = Field(description="Total area of the cells, km².", examples=[28048.6])
    h3_resolution: int = Field(
        description="H3 resolution of the cells (the region_res option).", examples=[3]
    )
    cells: list[str] = Field(
        description="The H3 cells, most probable first.", examples=[["83596cfffffffff"]]
    )
    geojson: dict[str, Any] = Field(
        description="The cells as a GeoJSON FeatureCollection: one Polygon per cell, with "
        "properties h3 and value (the cell's share of the mass)."
    )


class CountryOut(BaseModel):
    """One country's share of the probability mass."""

    country_code: str | None = Field(
        description="ISO 3166 alpha-2 code; null for points at sea.", examples=["LY"]
    )
    probability: float = Field(
        description="Share of the mass of all scored points that lies in this country (the "
        "shares of an answer sum to 1).",
        examples=[0.86],
    )


class NeighbourOut(BaseModel):
    """A reference image retrieved as similar to the picture (return_neighbours)."""

    id: int = Field(description="Id of the reference image in the reference index.")
    lat: float = Field(description="Latitude where the reference image was taken, degrees.")
    lon: float = Field(description="Longitude where the reference image was taken, degrees.")
    similarity: float = Field(description="Cosine similarity of the two images' embeddings.")
    structure: float | None = Field(
        None,
        description="Rank correlation of the two images' luminance layouts, when the reference "
        "index stores them; verification ranks the neighbours by similarity + "
        "structure_weight × structure.",
    )
    colour: float | None = Field(
        None,
        description="How closely the two images' colour thumbnails agree, 0 to 1 (0: no "
        "closer than colour_threshold), when the reference index stores them; verification "
        "adds colour_weight × colour to the ranking.",
    )
    width_km: float | None = Field(
        None,
        description="Ground width the reference image shows, km, when its reference table "
        "gave one (width_km column); verification trusts a narrow view's location more "
        "sharply (a kernel of neighbour_kernel_share × width_km where that is narrower than "
        "neighbour_kernel_km).",
    )


class LocateResponse(BaseModel):
    """The answer to one picture (or one text): ranked candidates with probabilities, the
    uncertainty region, country probabilities, the localizability verdict and what ran."""

    model_config = _examples(LOCATE_EXAMPLE)

    prediction_id: str | None = Field(
        description="Id for GET /v1/predictions/{id} and feedback; null when the database "
        "could not record it (see warnings)."
    )
    profile: str = Field(description="The model profile that answered.", examples=["bluemarble"])
    purpose: str = Field(description="What the model profile locates.")
    index_version: str = Field(description="The one index version ('name/version') used.")
    candidates: list[CandidateOut] = Field(
        description="At most top_k places, most probable first (distinct places when "
        "diversify ran)."
    )
    region: RegionOut | None = Field(
        description="The uncertainty region; null when the answer abstained."
    )
    countries: list[CountryOut] = Field(
        description="Probability of each country, most probable first; empty when the answer "
        "abstained."
    )
    stages: list[str] = Field(
        description="The pipeline stages that ran, in order: retrieve, refine, verify, "
        "near_copy (a near copy's place was made first), judge (the localizability verdict), "
        "diversify, describe; grey_view when the answer came from the picture's grey view, "
        "combine for an album's joint answer; then llm_diversify and llm_rerank when the LLM "
        "stages changed the answer. A stage switched off (an option or the profile) is "
        "missing.",
        examples=[["retrieve", "refine", "verify", "judge", "diversify", "describe"]],
    )
    timings_ms: dict[str, float] = Field(
        description="Milliseconds spent per step: queue (waiting for the micro-batcher), "
        "encode (the image tower; shared by a batch), then each stage."
    )
    localizability: LocalizabilityOut | None = Field(
        None,
        description="Whether this model can locate the picture at all; null without a fitted "
        "verdict (geoloc calibrate) and for text queries.",
    )
    neighbours: list[NeighbourOut] | None = Field(
        None, description="The retrieved reference images (return_neighbours); else null."
    )
    llm: LLMReport | None = Field(
        None, description="Whether the LLM stages ran, were skipped (and why) or failed."
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="What went wrong without failing the answer (e.g. the prediction was not "
        "recorded, the LLM stages failed).",
    )


class AlbumJSONRequest(LocateRequestOptions):
    """JSON form of /v1/locate/album: the pictures as base64 (data: URL prefixes accepted)."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    images_base64: list[str] = Field(
        ...,
        min_length=1,
        description="The pictures' bytes, base64-encoded: 2 to GEOLOC_MAX_ALBUM of them.",
    )
    spread_km: float | None = Field(
        None, ge=0, le=MAX_SPREAD_KM, description=SPREAD_DOC + " Default GEOLOC_ALBUM_SPREAD_KM."
    )


class AlbumImageOut(BaseModel):
    """One picture of an album: its own answer (or problem) and its part in the joint one."""

    index: int = Field(description="Position of the picture in the request.")
    filename: str | None = Field(None, description="The file's name in the request, if any.")
    weight: float = Field(
        description="Its share of the joint answer's evidence (the weights of an album sum to "
        "1): its localizability score times its agreement, normalised; 0 when it abstains, "
        "is an outlier of very low agreement, or could not be read."
    )
    agreement: float | None = Field(
        description="How probable this picture finds the joint answer, relative to how "
        "probable it finds its own (0 to 1; about 1 for a picture of the same place); null "
        "when it could not be read."
    )
    outlier: bool = Field(
        description="Whether it disagrees with the joint answer (agreement below "
        "GEOLOC_ALBUM_OUTLIER_BELOW): a picture of another place, say."
    )
    result: LocateResponse | None = Field(
        None, description="This picture's own answer (stored as a prediction); null on a problem."
    )
    problem: Problem | None = Field(
        None, description="Why this picture could not be used (problem+json body)."
    )


class AlbumResponse(LocateResponse):
    """POST /v1/locate/album: one joint answer for pictures of one place (the fields of a
    locate answer: candidates, region, countries, verdict), and each picture's own answer
    with its weight. ``prediction_id`` is the joint answer's: feedback on it applies to the
    joint answer."""

    model_config = _examples(
        {
            **LOCATE_EXAMPLE,
            "images": [
                {
                    "index": i,
                    "filename": f"view-{i}.jpg",
                    "weight": w,
                    "agreement": a,
                    "outlier": a < 0.5,
                    "result": {**LOCATE_EXAMPLE, "prediction_id": f"{i + 1:032x}"},
                    "problem": None,
                }
                for i, (w, a) in enumerate(((0.52, 1.0), (0.48, 0.93), (0.0, 0.01)))
            ],
            "used": 3,
            "spread_km": 25.0,
        }
    )

    images: list[AlbumImageOut] = Field(description="One per picture, in the order sent.")
    used: int = Field(description="Pictures that took part in the joint answer.")
    spread_km: float = Field(
        description="How far apart the pictures were taken, in km, as the joint answer assumed "
        "(the request's spread_km, else GEOLOC_ALBUM_SPREAD_KM).",
        examples=[25.0],
    )


class BatchItem(BaseModel):
    """One file of a batch: its answer or its problem."""

    index: int = Field(description="Position of the file in the request.")
    filename: str | None = Field(None, description="The file's name in the request, if any.")
    result: LocateResponse | None = Field(None, description="The answer; null on a problem.")
    problem: Problem | None = Field(
        None, description="Why this file got no answer (problem+json body); null on success."
    )


class BatchResponse(BaseModel):
    """POST /v1/locate/batch: one item per file, in order; one bad file fails only itself."""

    model_config = _examples(
        {
            "items": [
                {"index": 0, "filename": "sahara.png", "result": LOCATE_EXAMPLE, "problem": None},
                {
                    "index": 1,
                    "filename": "notes.txt",
                    "result": None,
                    "problem": {
                        "type": "https://geoloc.dev/problems/unsupported-media-type",
                        "title": "Unsupported image format",
                        "status": 415,
                        "detail": "notes.txt is not a JPEG, PNG or WebP image",
                        "instance": "/v1/locate/batch#1",
                    },
                },
            ],
            "succeeded": 1,
            "failed": 1,
        }
    )

    items: list[BatchItem] = Field(description="One per file, in the order sent.")
    succeeded: int = Field(description="Items with a result.")
    failed: int = Field(description="Items with a problem.")


# -- predictions and feedback --------------------------------------------------------------------


class PredictionOut(BaseModel):
    """A recorded answer."""

    model_config = _examples(
        {
            "id": _PREDICTION_ID,
            "created_at": "2026-01-31T12:00:00.123456Z",
            "profile": "bluemarble",
            "index_version": _INDEX_VERSION,
            "latency_ms": 79.7,
            "result": {
                k: v for k, v in LOCATE_EXAMPLE.items() if k not in ("prediction_id", "warnings")
            },
        }
    )

    id: str = Field(description="The prediction id (the locate answer's prediction_id).")
    created_at: datetime = Field(description="When the answer was given (UTC).")
    profile: str = Field(description="The model profile that answered.")
    index_version: str = Field(description="The index version ('name/version') used.")
    latency_ms: float = Field(description="Time from the request to the answer, ms.")
    result: dict[str, Any] = Field(description="The locate answer as it was returned.")


class FeedbackIn(BaseModel):
    """The true location of a predicted picture."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    lat: float = Field(..., ge=-90, le=90, description="True latitude, degrees.")
    lon: float = Field(..., ge=-180, le=180, description="True longitude, degrees.")


class FeedbackOut(BaseModel):
    """Feedback stored: the true location and how far the answer was from it."""

    model_config = _examples(
        {
            "prediction_id": _PREDICTION_ID,
            "lat": 23.0,
            "lon": 12.0,
            "error_km": 150.0,
            "created_at": "2026-01-31T12:05:00Z",
        }
    )

    prediction_id: str = Field(description="The prediction it is about.")
    lat: float = Field(description="True latitude, degrees.")
    lon: float = Field(description="True longitude, degrees.")
    error_km: float | None = Field(description="Distance from the top-1 candidate; null if none.")
    created_at: datetime = Field(description="When the feedback was stored (UTC).")


# -- statistics ----------------------------------------------------------------------------------


class RequestCount(BaseModel):
    """Requests of one route, method and status."""

    route: str = Field(description="The route's path template.", examples=["/v1/locate"])
    method: str = Field(description="HTTP method.", examples=["POST"])
    status: str = Field(description="HTTP status code.", examples=["200"])
    count: int = Field(description="Requests served.")


class RecallVsAreaOut(BaseModel):
    """Recall-vs-Area of the returned uncertainty regions (README, Evaluation)."""

    n: int = Field(description="Predictions measured.")
    recall_in_region: float | None = Field(
        description="Share of truths inside the returned uncertainty region at all."
    )
    area_km2_at_recall: dict[str, float | None] = Field(
        description="Recall level ('0.5', '0.9') -> km² searched, cells in the model's order, "
        "to reach it; null when the regions never reach it."
    )
    curve: dict[str, list[float | None]] = Field(
        description="area_km2 grid and the recall at each (null while nothing is measured)."
    )


class ReliabilityBin(BaseModel):
    """One bin of the reliability diagram."""

    lo: float = Field(description="Lower edge of the bin's top-1 probabilities (included).")
    hi: float = Field(description="Upper edge of the bin's top-1 probabilities.")
    n: int = Field(description="Predictions in the bin.")
    confidence: float = Field(description="Mean top-1 probability in the bin.")
    accuracy: float = Field(description="Share of top-1 answers within within_km.")


class CalibrationOut(BaseModel):
    """How well the top-1 probability states the chance that the truth is within within_km."""

    n: int = Field(description="Predictions measured.")
    within_km: float = Field(
        description="The event measured: the truth within this many km of the top-1 "
        "candidate (the within_km query parameter, default GEOLOC_CALIBRATION_KM)."
    )
    ece: float | None = Field(description="Expected calibration error of the top-1 probability.")
    mean_confidence: float | None = Field(description="Mean top-1 probability.")
    accuracy: float | None = Field(description="Share of top-1 answers within within_km.")
    bins: list[ReliabilityBin] = Field(description="The reliability diagram's non-empty bins.")


class StatsOut(BaseModel):
    """Prediction counts, the metrics of `geoloc eval` over the predictions with feedback in
    the window, and this process's request counts."""

    model_config = _examples(
        {
            "since": "2026-01-01T00:00:00Z",
            "until": None,
            "predictions": 120,
            "with_feedback": 40,
            "measured": 40,
            "within_km": {"1": 0.0, "25": 0.1, "200": 0.55, "750": 0.85, "2500": 0.975},
            "median_km": 180.4,
            "mean_km": 512.9,
            "mean_geoscore": 3870.2,
            "recall_vs_area": {
                "n": 40,
                "recall_in_region": 0.875,
                "area_km2_at_recall": {"0.5": 41200.0, "0.9": None},
                "curve": {"area_km2": [10.0, 1000.0, 100000.0], "recall": [0.0, 0.05, 0.7]},
            },
            "calibration": {
                "n": 40,
                "within_km": 50.0,
                "ece": 0.06,
                "mean_confidence": 0.31,
                "accuracy": 0.25,
                "bins": [
                    {"lo": 0.2, "hi": 0.3, "n": 22, "confidence": 0.26, "accuracy": 0.23},
                    {"lo": 0.3, "hi": 0.4, "n": 18, "confidence": 0.37, "accuracy": 0.28},
                ],
            },
            "requests": [{"route": "/v1/locate", "method": "POST", "status": "200", "count": 120}],
        }
    )

    since: datetime | None = Field(description="Start of the window (the since parameter).")
    until: datetime | None = Field(None, description="End of the window, excluded (until).")
    predictions: int = Field(description="Predictions made in the window.")
    with_feedback: int = Field(description="Of them, with feedback (a true location).")
    measured: int = Field(
        0, description="Predictions with feedback and a candidate measured (newest first)."
    )
    within_km: dict[str, float | None] = Field(
        description="Threshold in km ('1', '25', '200', '750', '2500') -> share of top-1 "
        "answers within it; null when nothing is measured."
    )
    median_km: float | None = Field(description="Median distance of the top-1 answer, km.")
    mean_km: float | None = Field(None, description="Mean distance of the top-1 answer, km.")
    mean_geoscore: float | None = Field(
        description="Mean GeoScore, 5000·exp(−d/1492.7) for a top-1 distance d in km."
    )
    recall_vs_area: RecallVsAreaOut | None = Field(
        None, description="Recall-vs-Area of the returned regions; null when none is measured."
    )
    calibration: CalibrationOut | None = Field(
        None, description="Calibration of the top-1 probability; null when none is measured."
    )
    requests: list[RequestCount] = Field(
        description="Requests this process served since it started, by route and status."
    )


# -- the instance --------------------------------------------------------------------------------


class ImageRuntimeInfo(BaseModel):
    """The image tower's runtime (GEOLOC_IMAGE_RUNTIME, GEOLOC_IMAGE_PRECISION)."""

    runtime: str = Field(description="What runs the image tower: torch or onnx.")
    precision: str = Field(
        description="fp32, int8 (int8 matrix products), int8-residual (int8 products of "
        "each activation's two 7-bit parts) or int8-fp32 (int8 products of the activations' "
        "and the weights' two parts: embeddings within 1e-4 of fp32's)."
    )
    tower_sha256: str | None = Field(
        None, description="sha256 of the image tower's weights the onnx export was made from."
    )


class ProfileInfo(BaseModel):
    """A model profile: its towers, what it locates, its embedding size and image runtime."""

    name: str = Field(description="Profile name (GEOLOC_PROFILE).")
    description: str = Field(description="The image and GPS towers, in words.")
    purpose: str = Field(description="What the profile locates.")
    embedding_dim: int = Field(description="Size of the image and GPS embeddings.")
    image_runtime: ImageRuntimeInfo = Field(description="What runs the image tower.")


class IndexInfo(BaseModel):
    """A published index version (its manifest)."""

    name: str = Field(description="Index name.")
    version: str = Field(description="Index version (a UTC time stamp).")
    count: int = Field(description="Points (or reference images) in the index.")
    gallery_kind: str = Field(
        description="h3 (H3 cell centres), csv (points from a table) or images (reference images)."
    )
    h3_resolution: int | None = Field(description="H3 resolution of an h3 gallery; else null.")
    factory: str = Field(description="The FAISS index type (e.g. Flat, IVF…,PQ…).")
    created_at: str = Field(description="When it was published (ISO 8601, UTC).")
    nprobe: int | None = Field(
        None, description="IVF lists searched by default (compressed indexes; None: exact)."
    )
    rerank_k: int = Field(
        0, description="Candidates re-scored by default with exact vectors (0: none kept)."
    )
    recall_at_10: float | None = Field(
        None, description="1-recall@10 measured at publication, at nprobe and rerank_k."
    )


class LimitsInfo(BaseModel):
    """The limits of this instance (GEOLOC_* settings of the same names)."""

    max_image_bytes: int = Field(description="Largest image file, bytes.")
    max_image_pixels: int = Field(description="Most pixels of a decoded image.")
    max_image_aspect: float = Field(description="Longest side over shortest side, at most.")
    max_jpeg_scans: int = Field(description="Most scans a (progressive) JPEG may have.")
    max_request_bytes: int = Field(description="Largest request body, bytes.")
    max_batch: int = Field(description="Most files in one batch.")
    max_album: int = Field(description="Most pictures in one album.")
    max_top_k: int = Field(description="Largest top_k.")
    rate_limit_per_minute: int = Field(description="Requests per minute per key (0: none).")
    request_timeout_s: float = Field(description="Deadline of one locate request, seconds.")


class CalibrationInfo(BaseModel):
    """The fitted softmax temperature in use."""

    version: str = Field(description="Calibration version (a UTC time stamp).")
    temperature: float = Field(description="The softmax temperature the logits are divided by.")
    within_km: float = Field(
        description="The event the top-1 probability is calibrated for: the truth within this "
        "many km of the top-1 candidate (GEOLOC_CALIBRATION_KM when it was fitted)."
    )
    created_at: str = Field(description="When it was fitted (ISO 8601, UTC).")
    data: dict[str, Any] = Field(description="The held-out data it was fitted on.")


class LocalizabilityInfo(BaseModel):
    """The localizability verdict in use and how it did on held-out data."""

    version: str = Field(description="The calibration it was fitted with.")
    created_at: str = Field(description="When it was fitted (ISO 8601, UTC).")
    t_low: float = Field(description="Below it: not_locatable.")
    t_high: float = Field(description="From it: located; between: uncertain.")
    abstain_below: float = Field(description="Answers below it abstain (GEOLOC_ABSTAIN_BELOW).")
    domain: str = Field(description="satellite or photo: the profile's kind of pictures.")
    uses_reference_images: bool = Field(
        description="Whether the verdict uses the reference images' similarity (fitted with a "
        "reference index)."
    )
    in_domain: dict[str, Any] | None = Field(
        description="Verdict shares on the fit's in-domain images, each scored by the fold's "
        "classifier that never saw it (out of fold)."
    )
    negatives: dict[str, Any] | None = Field(
        description="Verdict shares on the fit's generated non-domain images, out of fold."
    )
    negative_kinds: dict[str, int] | None = Field(
        description="Generated negatives of each kind the verdict was fitted on."
    )
    leave_one_kind_out: dict[str, dict[str, float]] | None = Field(
        None,
        description="For each negative kind, the share still flagged when it is left out of "
        "the fit: how the verdict holds for kinds of pictures it never saw.",
    )


_BLUEMARBLE_INDEX = {
    "name": "default-bluemarble",
    "version": _INDEX_VERSION.split("/")[1],
    "count": 2213,
    "gallery_kind": "h3",
    "h3_resolution": 2,
    "factory": "Flat",
    "created_at": "2026-01-31T12:00:00.000000Z",
    "nprobe": None,
    "rerank_k": 0,
    "recall_at_10": None,
}


class InfoOut(BaseModel):
    """What this instance serves: profile, indexes, limits, calibration and verdict."""

    model_config = _examples(
        {
            "profile": {
                "name": "bluemarble",
                "description": "Small ViT trained by geoloc on NASA Blue Marble imagery (about "
                "7.4 km/pixel)",
                "purpose": "satellite views of the Earth's surface (not ground photos)",
                "embedding_dim": 256,
                "image_runtime": {"runtime": "torch", "precision": "fp32", "tower_sha256": None},
            },
            "index": _BLUEMARBLE_INDEX,
            "reference_index": None,
            "limits": {
                "max_image_bytes": 20971520,
                "max_image_pixels": 40000000,
                "max_image_aspect": 20.0,
                "max_jpeg_scans": 32,
                "max_request_bytes": 67108864,
                "max_batch": 32,
                "max_album": 10,
                "max_top_k": 100,
                "rate_limit_per_minute": 0,
                "request_timeout_s": 30.0,
            },
            "auth_enabled": False,
            "url_fetch_enabled": False,
            "batching_enabled": True,
            "calibration": {
                "version": "20260131-121500-000000",
                "temperature": 0.62,
                "within_km": 50.0,
                "created_at": "2026-01-31T12:15:00Z",
                "data": {"path": "/data/calib/labels.csv", "sha256": "9f2c…", "rows": 2000},
            },
            "localizability": {
                "version": "20260131-121500-000000",
                "created_at": "2026-01-31T12:15:00Z",
                "t_low": 0.21,
                "t_high": 0.74,
                "abstain_below": 0.21,
                "domain": "satellite",
                "uses_reference_images": False,
                "in_domain": {"n": 600, "located": 0.9, "uncertain": 0.08, "not_locatable": 0.02},
                "negatives": {"n": 1200, "located": 0.01, "uncertain": 0.03, "not_locatable": 0.96},
                "negative_kinds": {"noise": 150, "text": 150, "flat": 150},
                "leave_one_kind_out": {
                    "text": {"flagged": 0.98, "not_locatable": 0.9, "in_domain_not_locatable": 0.02}
                },
            },
        }
    )

    profile: ProfileInfo = Field(description="The model profile served.")
    index: IndexInfo = Field(description="The gallery index version served.")
    reference_index: IndexInfo | None = Field(
        description="The reference-image index served (neighbours); null: none."
    )
    limits: LimitsInfo = Field(description="What one request may cost.")
    auth_enabled: bool = Field(description="Whether requests need an API key.")
    url_fetch_enabled: bool = Field(description="Whether POST /v1/locate/url is on.")
    batching_enabled: bool = Field(
        description="Whether the micro-batcher encodes concurrent requests together."
    )
    calibration: CalibrationInfo | None = Field(
        None, description="The fitted softmax temperature in use (geoloc calibrate); null: none."
    )
    localizability: LocalizabilityInfo | None = Field(
        None,
        description="The localizability verdict in use (fitted by geoloc calibrate with the "
        "calibration); null: none, answers carry no verdict.",
    )


class HealthOut(BaseModel):
    """The process runs (liveness)."""

    model_config = _examples({"status": "ok"})

    status: str = Field(description="Always 'ok' (any answer means the process runs).")


class ReadyOut(BaseModel):
    """Model, index and database are ready (readiness); else a 503 problem naming the parts."""

    model_config = _examples(
        {
            "status": "ready",
            "checks": {"model": "ok", "index": "ok", "database": "ok", "shutdown": "ok"},
            "index_version": _INDEX_VERSION,
        }
    )

    status: str = Field(description="'ready'.")
    checks: dict[str, str] = Field(
        description="Each part (model, index, database, shutdown) -> 'ok' or what is wrong."
    )
    index_version: str = Field(description="The index version ('name/version') served.")


# -- admin ---------------------------------------------------------------------------------------


class ActivateIn(BaseModel):
    """The index version to serve."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=64, description="Index name.")
    version: str = Field(..., min_length=1, max_length=64, description="Published version.")


class ActivateOut(BaseModel):
    """The version now active: every replica swaps to it at its next index poll."""

    model_config = _examples(
        {
            "name": "default-bluemarble",
            "version": _INDEX_VERSION.split("/")[1],
            "profile": "bluemarble",
            "gallery_kind": "h3",
            "count": 2213,
            "active": True,
        }
    )

    name: str = Field(description="Index name.")
    version: str = Field(description="The version activated.")
    profile: str = Field(description="The model profile it was built for.")
    gallery_kind: str = Field(description="h3, csv or images (as IndexInfo).")
    count: int = Field(description="Points (or reference images) in the index.")
    active: bool = Field(description="True: it is the active version now.")
