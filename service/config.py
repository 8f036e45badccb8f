"""The one Settings object. Environment (GEOLOC_*) -> Settings -> plain arguments."""

from __future__ import annotations

from dataclasses import fields
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, get_type_hints

from pydantic import Field, SecretStr, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.engine.options import (
    MAX_SPREAD_KM,
    SERVICE_OPTIONS,
    SPREAD_DOC,
    AlbumConfig,
    ImageLimits,
    LocateOptions,
)

_DEFAULTS = LocateOptions()
#: One setting (GEOLOC_<NAME>) per option with a service-wide default, typed and defaulted
#: by LocateOptions itself.
_HINTS = get_type_hints(LocateOptions)
_LocateDefaults = create_model(
    "_LocateDefaults",
    __base__=BaseSettings,
    **{name: (_HINTS[name], getattr(_DEFAULTS, name)) for name in SERVICE_OPTIONS},
)
#: Where ``python -m service.api.webpage build`` puts the page's built files (gitignored).
DEFAULT_WEB_ASSETS_DIR = Path(__file__).resolve().parent / "web" / "static"


class Settings(_LocateDefaults):
    model_config = SettingsConfigDict(env_prefix="GEOLOC_", env_file=".env", extra="ignore")

    # -- where things live ---------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="Indexes, database and caches live here.")
    profile: str = Field("bluemarble", description="Model profile (geoloc profiles lists them).")
    index_name: str = Field("", description="Index to serve; empty: 'default-<profile>'.")
    index_version: str = Field("", description="Pinned index version; empty: the newest.")
    reference_index: str = Field(
        "", description="Image-neighbour index; empty: 'refs-<profile>' when it exists."
    )
    checkpoint: Path | None = Field(
        None, description="geoloc checkpoint replacing bundled weights."
    )
    backbone_checkpoint: Path | None = Field(
        None, description="Local open_clip checkpoint file for the image backbone."
    )
    device: str = Field(
        "cpu",
        description="torch device: cpu, cuda, cuda:1 ..., or auto (CUDA when a GPU is visible)",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch threads per process; 0: every core with one worker, cores ÷ "
        "workers with several (geoloc serve divides the OpenMP/BLAS pools the same way).",
    )
    image_runtime: Literal["torch", "onnx"] = Field(
        "torch",
        description="What runs the image tower: torch, or onnx (ONNX Runtime on the CPU; "
        "the tower is exported once into <data_dir>/runtimes and re-exported when the "
        "weights change).",
    )
    image_precision: Literal["fp32", "int8", "int8-residual", "int8-fp32"] = Field(
        "fp32",
        description="Image-tower precision: fp32; int8 (int8 matrix products, the fastest; "
        "answers move where candidates are nearly tied); int8-residual (each activation "
        "as two 7-bit parts: twice int8's products, answers within 1 km of fp32's on 98 % of "
        "bluemarble's test tiles); or int8-fp32 (the weights in two parts too: three int8 "
        "products, embeddings within 1e-4 of fp32's on the models measured). The int8 ones need "
        "GEOLOC_IMAGE_RUNTIME=onnx.",
    )
    image_int8_portable: bool = Field(
        False,
        description="Export int8 weights within 7 bits even where this CPU has VNNI (where "
        "full 8-bit weights halve the error), and refuse an export with full 8-bit weights. "
        "For an export that replicas on other CPUs load read-only, and for encoders (Ray) on "
        "mixed CPUs: a CPU without VNNI refuses full 8-bit weights (they saturate there).",
    )

    # -- limits --------------------------------------------------------------------------
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Largest image accepted.")
    max_image_pixels: int = Field(40_000_000, gt=0, description="Most pixels (w×h) accepted.")
    max_image_aspect: float = Field(
        20.0,
        ge=1.0,
        description="Longest side over shortest side accepted (a 20:1 panorama passes; a "
        "1,000,000 x 1 strip is refused from its header, before it is decoded).",
    )
    max_jpeg_scans: int = Field(
        32,
        ge=1,
        description="Most scans a JPEG may have (a baseline JPEG has 1, a progressive one "
        "about 10): a JPEG repeating a scan 1,000 times decodes for a minute.",
    )
    deblock_above: float = Field(
        5.0,
        ge=0.0,
        description="A decoded picture whose 8-pixel block edges are this many times "
        "sharper than its other pixel steps (a heavily compressed JPEG: about quality 10 "
        "or less) is smoothed (Gaussian, 1.2 px) before the model sees it; 0: never.",
    )
    max_batch: int = Field(32, gt=0, description="Most images in one locate call.")
    max_album: int = Field(
        10,
        ge=2,
        le=64,
        description="Most pictures in one album (POST /v1/locate/album, locate --album); the "
        "album's pictures pass the image tower as one batch.",
    )
    max_top_k: int = Field(100, gt=0, description="Largest top_k a request may ask for.")
    max_retrieve_k: int = Field(2048, gt=0, description="Largest retrieve_k a request may ask for.")
    max_text_chars: int = Field(
        1000, gt=0, description="Longest text query (POST /v1/locate/text, locate --text)."
    )

    # -- pipeline defaults (a request may override within the limits) ---------------------
    # The SERVICE_OPTIONS of service/engine/options.py come from _LocateDefaults (same names, types
    # and defaults as LocateOptions); these two add their bounds and meaning.
    nprobe: int = Field(
        _DEFAULTS.nprobe,
        ge=0,
        description="IVF lists a compressed index searches; 0: the index's own (the value its "
        "manifest's recall was measured at). A request may ask for 1..max_nprobe.",
    )
    max_nprobe: int = Field(1024, ge=1, description="Largest nprobe a request may ask for.")
    rerank_k: int | None = Field(
        _DEFAULTS.rerank_k,
        ge=0,
        description="Best candidates of a compressed index re-scored with its exact vectors; "
        "unset: the index's own (its manifest's rerank_k), 0: off. A request may ask for "
        "0..max_rerank_k.",
    )
    max_rerank_k: int = Field(
        2048, ge=0, description="Largest rerank_k a request may ask for (rows read from disk)."
    )

    # -- albums (service/engine/album.py) -------------------------------------------------
    album_temperature: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Temperature of an album's joint answer: the weighted sum of its pictures' "
        "log-likelihoods is divided by it (pictures of one place are not independent evidence).",
    )
    album_uniform: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Share of a uniform component in each picture's likelihood: bounds how "
        "far one picture (from elsewhere, or with no location cues) can pull the joint answer.",
    )
    album_spread_km: float = Field(
        25.0, ge=0, le=MAX_SPREAD_KM, description=SPREAD_DOC + " A request may ask for its own."
    )
    album_outlier_below: float = Field(
        0.5,
        ge=0,
        le=1,
        description="A picture whose agreement with the joint answer is below this is treated "
        "as an outlier (its weight is its agreement times its localizability).",
    )

    # -- calibration and evaluation ------------------------------------------------------
    calibration: str = Field(
        "latest",
        pattern=r"^(latest|off|[A-Za-z0-9._-]+)$",
        description="Softmax temperature fitted by `geoloc calibrate` for the served index "
        "version: 'latest', 'off' or a calibration version.",
    )
    calibration_km: float = Field(
        50.0,
        gt=0,
        le=20_000,
        description="The event the top-1 probability states: the truth is within this many "
        "km of the candidate. Calibrate fits it; eval and /v1/stats measure its ECE.",
    )
    calibration_negatives: int = Field(
        150,
        ge=0,
        description="Generated non-domain pictures of each kind that `geoloc calibrate` (and "
        "`geoloc setup`) fit the localizability verdict on; 0: no verdict.",
    )
    abstain_below: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Answers whose localizability score is below this abstain (200, candidates "
        "flagged unreliable, no country probabilities, no region); unset: the fitted t_low of "
        "the served calibration's verdict.",
    )
    stats_max_predictions: int = Field(
        50_000,
        gt=0,
        description="Most predictions with feedback /v1/stats measures (the newest in the window).",
    )

    # -- LLM stages (optional; off unless llm_base_url is set; docs/API.md "LLM") --------
    # Per-request defaults (a request may switch either off or on).
    llm_base_url: str = Field(
        "",
        description="OpenAI-compatible API base URL (…/v1) of a vision model: vLLM, Ollama, "
        "llama.cpp server, OpenAI; empty: no LLM.",
    )
    llm_model: str = Field("", description="Model name sent with every LLM call.")
    llm_api_key: SecretStr = Field(
        SecretStr(""), description="Bearer key of the LLM server; empty: none sent."
    )
    llm_timeout_s: float = Field(
        15.0, gt=0, description="One LLM HTTP attempt (clipped to what is left of the budget)."
    )
    llm_connect_timeout_s: float = Field(2.0, gt=0, description="Connecting to the LLM server.")
    llm_budget_s: float = Field(
        25.0,
        gt=0,
        description="The most the LLM stages add to one request: calls, retries and waits "
        "(also cut at GEOLOC_REQUEST_TIMEOUT_S from the request's start).",
    )
    llm_max_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Retries of one call on 429, 5xx, timeouts, refused connections.",
    )
    llm_backoff_s: float = Field(
        0.5, ge=0, description="First retry wait (doubles each retry, with jitter)."
    )
    llm_backoff_max_s: float = Field(8.0, ge=0, description="Longest retry wait.")
    llm_breaker_failures: int = Field(
        5, ge=1, description="Consecutive failed attempts that open the circuit breaker."
    )
    llm_breaker_cooldown_s: float = Field(
        30.0, ge=0, description="How long the open breaker skips the LLM before one trial call."
    )
    llm_max_concurrency: int = Field(
        4, ge=1, description="LLM calls in flight at once in this process."
    )
    llm_max_tokens: int = Field(300, ge=16, description="max_tokens of every LLM call.")
    llm_json_mode: bool = Field(
        True,
        description='Send response_format {"type": "json_object"} (off for servers that '
        "refuse it).",
    )
    llm_temperature: float = Field(
        0.7, ge=0, le=2, description="Sampling temperature of the diversification prompts."
    )
    llm_diversify_k: Annotated[tuple[int, ...], NoDecode] = Field(
        (0, 5, 10),
        description="Diversification prompts: how many candidates each carries (0: zero-shot); "
        "comma-separated, e.g. 0,5,10.",
    )
    llm_samples: int = Field(
        2, ge=1, le=10, description="Answers sampled per diversification prompt."
    )
    llm_rerank_k: int = Field(5, ge=2, le=26, description="Candidates the reranking shows the LLM.")
    llm_rerank_weight: float = Field(
        1.0,
        ge=0,
        le=10,
        description="Largest log-odds bonus the LLM's reranking gives a candidate (its first "
        "choice gets all of it).",
    )
    llm_image_max_side: int = Field(
        512, ge=32, le=4096, description="The image goes to the LLM as JPEG of at most this side."
    )
    llm_metadata_max_chars: int = Field(
        200, ge=0, le=2000, description="Request text (file name, EXIF) per field sent to the LLM."
    )
    llm_metadata_max_fields: int = Field(
        8, ge=0, le=50, description="Request text fields (file name, EXIF tags) sent to the LLM."
    )

    @field_validator("llm_diversify_k", mode="before")
    @classmethod
    def _split_k(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(int(x) for x in value.replace(" ", "").split(",") if x)
        return value

    @field_validator("llm_diversify_k")
    @classmethod
    def _check_k(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(not 0 <= k <= 50 for k in value):
            raise ValueError("llm_diversify_k: one or more numbers of candidates, each 0..50")
        return tuple(dict.fromkeys(value))

    @model_validator(mode="after")
    def _check_runtime(self) -> Settings:
        if self.image_precision != "fp32" and self.image_runtime == "torch":
            raise ValueError(
                f"image_precision {self.image_precision} needs image_runtime onnx "
                "(GEOLOC_IMAGE_RUNTIME=onnx); "
                "the torch runtime runs fp32"
            )
        return self

    # -- large reference galleries (geoloc images add) -------------------------------------
    refs_shard_rows: int = Field(
        10_000, ge=1, description="Rows per shard of an images-add job (the unit of resuming)."
    )
    refs_ray_min_rows: int = Field(
        50_000, ge=1, description="Jobs with at least this many rows run on Ray (runner auto)."
    )
    ray_address: str = Field(
        "", description="Ray cluster address for images-add jobs; empty: a local Ray."
    )
    ray_num_cpus: int = Field(2, ge=1, description="CPUs of the local Ray an images-add starts.")
    ray_actors: int = Field(2, ge=1, description="Encoder actors of a Ray images-add job.")
    compressed_min_rows: int = Field(
        1_000_000,
        ge=1,
        description="Reference indexes with at least this many images are compressed "
        "(IVF-PQ, inverted lists on disk); smaller ones are exact (Flat).",
    )
    index_train_size: int = Field(
        200_000, ge=1000, description="Vectors a compressed index is trained on (a sample)."
    )
    index_nprobe: int = Field(
        64, ge=1, description="nprobe a new compressed index keeps, its recall measured at."
    )
    index_rerank_k: int = Field(
        128,
        ge=0,
        description="A new compressed index keeps its vectors as float16 on disk and re-scores "
        "this many best candidates with them (recall beyond what PQ codes allow); 0: no "
        "exact vectors kept.",
    )
    index_recall_queries: int = Field(
        200, ge=0, description="Queries of the recall measurement recorded in the manifest."
    )
    faiss_device: str = Field(
        "auto",
        pattern="^(auto|cpu|gpu)$",
        description="auto: faiss on a GPU when faiss-gpu sees one (index training), else CPU.",
    )

    # -- first start (geoloc setup, make run) ------------------------------------------------
    default_res: int = Field(
        4, ge=0, le=7, description="H3 resolution of the default gallery `geoloc setup` builds."
    )
    setup_reference_tiles: int = Field(
        160_000,
        ge=0,
        description="Clean reference tiles `geoloc setup` renders and embeds into the "
        "image-neighbour index of a profile that makes its own data (bluemarble); 0: none.",
    )
    setup_calibration_tiles: int = Field(
        2000,
        ge=0,
        description="Held-out tiles `geoloc setup` fits the calibration on (profiles that make "
        "their own data); 0: no calibration.",
    )
    setup_seed: int = Field(
        20_240,
        description="Seed of the tiles `geoloc setup` renders: references use it, the held-out "
        "calibration tiles seed+1 (other than the benchmarks' 12345 and 777 and training's 0).",
    )

    # -- persistence ---------------------------------------------------------------------
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty: SQLite at <data_dir>/geoloc.db."
    )
    redis_url: str = Field("", description="Redis URL for shared rate limits; empty: in-process.")
    database_wait_s: float = Field(
        15.0,
        gt=0,
        description="How long a database write waits for another's lock before failing "
        "(SQLite busy timeout, PostgreSQL lock_timeout).",
    )

    # -- http ----------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address `geoloc serve` listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port `geoloc serve` listens on.")
    workers: int = Field(1, ge=1, description="uvicorn worker processes of `geoloc serve`.")
    max_request_bytes: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="Largest request body (all images of a batch, base64 included); "
        "counted while reading, also without Content-Length.",
    )
    auth_enabled: bool = Field(
        False, description="Require an API key (Authorization: Bearer or X-API-Key)."
    )
    rate_limit_per_minute: int = Field(
        0, ge=0, description="Requests per minute per API key (per client IP without auth); 0: off."
    )
    redis_prefix: str = Field("geoloc", description="Prefix of the Redis keys of the service.")
    url_fetch_enabled: bool = Field(False, description="Serve POST /v1/locate/url.")
    url_fetch_timeout_s: float = Field(
        10.0, gt=0, description="Total time to fetch one image URL, redirects included."
    )
    batching_enabled: bool = Field(
        True, description="Micro-batch concurrent requests through the image tower."
    )
    batch_max_size: int = Field(16, ge=1, description="Most images in one micro-batch.")
    batch_max_wait_ms: float = Field(
        5.0, ge=0, description="How long a micro-batch waits for more images."
    )
    queue_max: int = Field(
        64, ge=1, description="Images waiting for the model before requests get 503."
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of one image in the model queue (then 504)."
    )
    index_poll_s: float = Field(
        5.0,
        ge=0,
        description="How often the active index version is read and the database checked "
        "(readiness); 0: never.",
    )
    web_assets_dir: Path | None = Field(
        None,
        description="Built libraries and base map of the web page at /; empty: "
        "service/web/static (python -m service.api.webpage build).",
    )

    # -- deployment (several replicas behind a load balancer) ---------------------------
    replica_name: str = Field(
        "", description="Sent as the X-Geoloc-Replica response header; empty: the host name."
    )
    migrate_on_start: bool = Field(
        False,
        description="`geoloc serve` first waits for the database and migrates it to head "
        "(under a lock: replicas starting together migrate once).",
    )
    database_start_timeout_s: float = Field(
        60.0,
        gt=0,
        description="How long start-up waits for the database to accept connections "
        "(migrate_on_start, `geoloc db upgrade --wait`).",
    )
    database_connect_timeout_s: float = Field(
        5.0, ge=1, description="Timeout of one connection attempt to PostgreSQL."
    )
    shutdown_drain_s: float = Field(
        0.0,
        ge=0,
        description="On SIGTERM, keep serving this long with /readyz at 503 before closing the "
        "listener (for balancers that poll readiness; 0 with nginx's passive checks).",
    )
    shutdown_grace_s: float = Field(
        30.0,
        gt=0,
        description="On SIGTERM, how long in-flight requests may still run before they are "
        "cancelled and the process exits.",
    )

    @property
    def index_dir(self) -> Path:
        return self.data_dir

    @property
    def runtimes_dir(self) -> Path:
        """Exported image towers (encoders.runtime artifacts)."""
        return self.data_dir / "runtimes"

    @property
    def db_url(self) -> str:
        # An absolute path: a relative data_dir must not depend on where alembic or a worker runs.
        return self.database_url or f"sqlite:///{(self.data_dir / 'geoloc.db').resolve()}"

    @property
    def default_index(self) -> str:
        return self.index_name or f"default-{self.profile}"

    @property
    def web_assets_path(self) -> Path:
        return self.web_assets_dir or DEFAULT_WEB_ASSETS_DIR

    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            self.max_image_bytes,
            self.max_image_pixels,
            self.max_image_aspect,
            self.max_jpeg_scans,
            self.deblock_above,
        )

    def album_config(self, spread_km: float | None = None) -> AlbumConfig:
        """How albums are combined; ``spread_km``: a request's own spread (None: the setting)."""
        return AlbumConfig(
            uniform=self.album_uniform,
            temperature=self.album_temperature,
            outlier_below=self.album_outlier_below,
            spread_km=self.album_spread_km if spread_km is None else spread_km,
        )

    def locate_options(self, **overrides: object) -> LocateOptions:
        """Defaults from settings, overridden per call, then checked against the limits."""
        base: dict[str, object] = {
            f.name: getattr(self, f.name) for f in fields(LocateOptions) if f.name in _PIPELINE
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        if overrides.get("retrieve_k") is None:
            # A large top_k needs at least as many retrieved points.
            base["retrieve_k"] = max(int(base["retrieve_k"]), int(base["top_k"]))  # type: ignore[call-overload]
        opts = LocateOptions(**base)  # type: ignore[arg-type]
        return opts.validate(
            max_top_k=self.max_top_k,
            max_retrieve_k=self.max_retrieve_k,
            max_nprobe=self.max_nprobe,
            max_rerank_k=self.max_rerank_k,
        )


_PIPELINE = {f.name for f in fields(LocateOptions)} & set(Settings.model_fields)


@lru_cache
def get_settings() -> Settings:
    return Settings()
