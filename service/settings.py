"""The one Settings object. Environment (GEOLOC_*) -> Settings -> plain arguments."""

from __future__ import annotations

from dataclasses import fields
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.pipeline import LocateOptions

_DEFAULTS = LocateOptions()


class Settings(BaseSettings):
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
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 ...")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0: torch's default.")

    # -- limits --------------------------------------------------------------------------
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Largest image accepted.")
    max_image_pixels: int = Field(40_000_000, gt=0, description="Most pixels (w×h) accepted.")
    max_batch: int = Field(32, gt=0, description="Most images in one locate call.")
    max_top_k: int = Field(100, gt=0, description="Largest top_k a request may ask for.")
    max_retrieve_k: int = Field(2048, gt=0, description="Largest retrieve_k a request may ask for.")

    # -- pipeline defaults (a request may override within the limits) ---------------------
    # Same names and defaults as LocateOptions; see service/pipeline.py for meanings.
    top_k: int = _DEFAULTS.top_k
    retrieve_k: int = _DEFAULTS.retrieve_k
    refine_beam: int = _DEFAULTS.refine_beam
    refine_width: int = _DEFAULTS.refine_width
    refine_levels: int = _DEFAULTS.refine_levels
    refine_start_res: int = _DEFAULTS.refine_start_res
    nms_km: float = _DEFAULTS.nms_km
    region_share: float = _DEFAULTS.region_share
    region_res: int = _DEFAULTS.region_res
    neighbours: int = _DEFAULTS.neighbours
    neighbour_weight: float = _DEFAULTS.neighbour_weight
    neighbour_kernel_km: float = _DEFAULTS.neighbour_kernel_km
    neighbour_temperature: float = _DEFAULTS.neighbour_temperature

    # -- persistence ---------------------------------------------------------------------
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty: SQLite at <data_dir>/geoloc.db."
    )
    redis_url: str = Field("", description="Redis URL for shared rate limits; empty: in-process.")

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
        5.0, ge=0, description="How often the active index version is read; 0: never."
    )

    @property
    def index_dir(self) -> Path:
        return self.data_dir

    @property
    def db_url(self) -> str:
        # An absolute path: a relative data_dir must not depend on where alembic or a worker runs.
        return self.database_url or f"sqlite:///{(self.data_dir / 'geoloc.db').resolve()}"

    @property
    def default_index(self) -> str:
        return self.index_name or f"default-{self.profile}"

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
        return opts.validate(max_top_k=self.max_top_k, max_retrieve_k=self.max_retrieve_k)


_PIPELINE = {f.name for f in fields(LocateOptions)} & set(Settings.model_fields)


@lru_cache
def get_settings() -> Settings:
    return Settings()
