"""Request and response bodies of the HTTP API (pydantic). No logic beyond shape and bounds."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.api.problems import Problem
from service.engine.llm_stages import LLMReport

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
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    url: str = Field(..., min_length=1, max_length=2048, description="http(s) URL of the image.")
    options: LocateBodyOptions | None = None


class CandidateOut(BaseModel):
    lat: float
    lon: float
    probability: float
    score: float = Field(description="Cosine similarity of the image and the place.")
    h3: str = Field(description="H3 cell (resolution 10) of the point.")
    source: str = Field(description="gallery, refined, neighbour or llm (an LLM proposal).")
    country_code: str | None = None
    country: str | None = None
    admin1: str | None = None
    city: str | None = None
    llm_rank: int | None = Field(
        None, description="Position in the LLM's reranking (1: its first choice), if ranked."
    )
    reliable: bool = Field(
        True,
        description="False when the answer abstained (localizability below the abstain "
        "threshold): the point is the model's best guess, not a location to rely on.",
    )


class LocalizabilityOut(BaseModel):
    score: float = Field(
        ge=0, le=1, description="How much the picture is like those the model can locate."
    )
    verdict: Literal["located", "uncertain", "not_locatable"] = Field(
        description="not_locatable below the fitted t_low, located from t_high, else uncertain."
    )
    reason: str = Field(description="Why, in words.")
    abstained: bool = Field(
        description="The score is below the abstain threshold (GEOLOC_ABSTAIN_BELOW, default "
        "t_low): every candidate is unreliable, no country probabilities, no region."
    )


class RegionOut(BaseModel):
    share: float = Field(description="The mass asked for.")
    covered: float = Field(description="The mass the cells hold.")
    area_km2: float
    h3_resolution: int
    cells: list[str]
    geojson: dict[str, Any]


class CountryOut(BaseModel):
    country_code: str | None
    probability: float


class NeighbourOut(BaseModel):
    id: int
    lat: float
    lon: float
    similarity: float = Field(description="Cosine similarity of the two images' embeddings.")
    structure: float | None = Field(
        None,
        description="Rank correlation of the two images' luminance layouts, when the reference "
        "index stores them; verification ranks the neighbours by similarity + "
        "structure_weight × structure.",
    )


class LocateResponse(BaseModel):
    prediction_id: str | None = Field(
        description="Id for GET /v1/predictions/{id} and feedback; null when the database "
        "could not record it (see warnings)."
    )
    profile: str
    purpose: str = Field(description="What the model profile locates.")
    index_version: str = Field(description="The one index version ('name/version') used.")
    candidates: list[CandidateOut]
    region: RegionOut | None
    countries: list[CountryOut]
    stages: list[str] = Field(description="The pipeline stages that ran.")
    timings_ms: dict[str, float]
    localizability: LocalizabilityOut | None = Field(
        None,
        description="Whether this model can locate the picture at all; null without a fitted "
        "verdict (geoloc calibrate) and for text queries.",
    )
    neighbours: list[NeighbourOut] | None = None
    llm: LLMReport | None = Field(
        None, description="Whether the LLM stages ran, were skipped (and why) or failed."
    )
    warnings: list[str] = Field(default_factory=list)


class BatchItem(BaseModel):
    index: int = Field(description="Position of the file in the request.")
    filename: str | None = None
    result: LocateResponse | None = None
    problem: Problem | None = None


class BatchResponse(BaseModel):
    items: list[BatchItem]
    succeeded: int
    failed: int


class PredictionOut(BaseModel):
    id: str
    created_at: datetime
    profile: str
    index_version: str
    latency_ms: float
    result: dict[str, Any] = Field(description="The locate answer as it was returned.")


class FeedbackIn(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    lat: float = Field(..., ge=-90, le=90)
    lon: float = Field(..., ge=-180, le=180)


class FeedbackOut(BaseModel):
    prediction_id: str
    lat: float
    lon: float
    error_km: float | None = Field(description="Distance from the top-1 candidate; null if none.")
    created_at: datetime


class RequestCount(BaseModel):
    route: str
    method: str
    status: str
    count: int


class RecallVsAreaOut(BaseModel):
    n: int
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
    lo: float
    hi: float
    n: int
    confidence: float = Field(description="Mean top-1 probability in the bin.")
    accuracy: float = Field(description="Share of top-1 answers within within_km.")


class CalibrationOut(BaseModel):
    n: int
    within_km: float
    ece: float | None = Field(description="Expected calibration error of the top-1 probability.")
    mean_confidence: float | None
    accuracy: float | None
    bins: list[ReliabilityBin]


class StatsOut(BaseModel):
    since: datetime | None
    until: datetime | None = None
    predictions: int
    with_feedback: int
    measured: int = Field(
        0, description="Predictions with feedback and a candidate measured (newest first)."
    )
    within_km: dict[str, float | None]
    median_km: float | None
    mean_km: float | None = None
    mean_geoscore: float | None
    recall_vs_area: RecallVsAreaOut | None = None
    calibration: CalibrationOut | None = None
    requests: list[RequestCount] = Field(
        description="Requests this process served since it started, by route and status."
    )


class ImageRuntimeInfo(BaseModel):
    runtime: str = Field(description="What runs the image tower: torch or onnx.")
    precision: str = Field(description="fp32, or int8 (int8 weights in the matrix products).")
    tower_sha256: str | None = Field(
        None, description="sha256 of the image tower's weights the onnx export was made from."
    )


class ProfileInfo(BaseModel):
    name: str
    description: str
    purpose: str
    embedding_dim: int
    image_runtime: ImageRuntimeInfo


class IndexInfo(BaseModel):
    name: str
    version: str
    count: int
    gallery_kind: str
    h3_resolution: int | None
    factory: str
    created_at: str
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
    max_image_bytes: int
    max_image_pixels: int
    max_image_aspect: float
    max_jpeg_scans: int
    max_request_bytes: int
    max_batch: int
    max_top_k: int
    rate_limit_per_minute: int
    request_timeout_s: float


class CalibrationInfo(BaseModel):
    version: str
    temperature: float
    within_km: float = Field(description="The event the top-1 probability states.")
    created_at: str
    data: dict[str, Any] = Field(description="The held-out data it was fitted on.")


class LocalizabilityInfo(BaseModel):
    version: str = Field(description="The calibration it was fitted with.")
    created_at: str
    t_low: float = Field(description="Below it: not_locatable.")
    t_high: float = Field(description="From it: located; between: uncertain.")
    abstain_below: float = Field(description="Answers below it abstain (GEOLOC_ABSTAIN_BELOW).")
    domain: str = Field(description="satellite or photo: the profile's kind of pictures.")
    uses_reference_images: bool
    in_domain: dict[str, Any] | None = Field(
        description="Verdict shares on held-out in-domain images of the fit's validation split."
    )
    negatives: dict[str, Any] | None = Field(
        description="Verdict shares on generated non-domain images of the validation split."
    )
    negative_kinds: dict[str, int] | None = Field(
        description="Generated negatives of each kind the verdict was fitted on."
    )
    leave_one_kind_out: dict[str, dict[str, float]] | None = Field(
        None,
        description="For each negative kind, the share still flagged when it is left out of "
        "the fit: how the verdict holds for kinds of pictures it never saw.",
    )


class InfoOut(BaseModel):
    profile: ProfileInfo
    index: IndexInfo
    reference_index: IndexInfo | None
    limits: LimitsInfo
    auth_enabled: bool
    url_fetch_enabled: bool
    batching_enabled: bool
    calibration: CalibrationInfo | None = Field(
        None, description="The fitted softmax temperature in use (geoloc calibrate); null: none."
    )
    localizability: LocalizabilityInfo | None = Field(
        None,
        description="The localizability verdict in use (fitted by geoloc calibrate with the "
        "calibration); null: none, answers carry no verdict.",
    )


class HealthOut(BaseModel):
    status: str


class ReadyOut(BaseModel):
    status: str
    checks: dict[str, str]
    index_version: str


class ActivateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=64)
    version: str = Field(..., min_length=1, max_length=64)


class ActivateOut(BaseModel):
    name: str
    version: str
    profile: str
    gallery_kind: str
    count: int
    active: bool
