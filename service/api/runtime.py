"""What a running service holds (model + index, database, batcher, limiter, metrics) and the
background work that keeps it current: index hot swap and the schema check.

The served Locator is one attribute, replaced whole: a request reads it once and keeps that
object, so a swap never changes the index under a request, and each answer names one version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import anyio
from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from encoders import GeoModel
from index.store import load_index
from service.api.metrics import Metrics
from service.api.problems import DatabaseUnavailableError, NotReadyError
from service.api.ratelimit import RateLimiter, make_limiter
from service.config import Settings
from service.db import (
    active_index_version,
    check_at_head,
    check_writable,
    display_url,
    error_line,
    make_engine,
    make_sessionmaker,
)
from service.engine.batching import MicroBatcher
from service.engine.llm_stages import LLMStage
from service.engine.loading import calibration_for, load_geomodel, load_locator
from service.engine.locator import Locator
from service.errors import GeolocError

log = logging.getLogger(__name__)


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    batcher: MicroBatcher
    limiter: RateLimiter | None = None
    engine: Engine | None = None
    sessions: sessionmaker[Session] | None = None
    locator: Locator | None = None
    #: Why the model/index is not loaded (None when it is).
    locator_error: str | None = "not loaded yet"
    #: Why the database cannot be used (None when it is at head).
    db_error: str | None = "not checked yet"
    #: SIGTERM received: /readyz answers 503 while the in-flight requests finish.
    draining: bool = False
    #: The optional LLM stages (None: no GEOLOC_LLM_BASE_URL).
    llm: LLMStage | None = None
    _model: GeoModel | None = None
    _failed_version: str | None = None
    _poke: asyncio.Event = field(default_factory=asyncio.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    _stopping: bool = False
    _task: asyncio.Task[None] | None = None

    @property
    def model_loaded(self) -> bool:
        return self._model is not None

    # -- access for requests ----------------------------------------------------------------
    def require_locator(self) -> Locator:
        loc = self.locator
        if loc is None:
            raise NotReadyError(
                f"the model or index is not loaded: {self.locator_error}",
                headers={"Retry-After": "5"},
            )
        return loc

    def require_sessions(self) -> sessionmaker[Session]:
        if self.sessions is None or self.db_error is not None:
            raise DatabaseUnavailableError(
                f"the database cannot be used: {self.db_error}", headers={"Retry-After": "5"}
            )
        return self.sessions

    # -- start and stop -------------------------------------------------------------------------
    async def start(self, injected: Locator | None) -> None:
        """Open the database, load (or take) the Locator, start the batcher and the poller.

        Safe to call again after ``stop`` (a test client may run the lifespan twice)."""
        s = self.settings
        self._loop = asyncio.get_running_loop()
        self._poke = asyncio.Event()
        self._stopping = False
        self.draining = False
        self.limiter = make_limiter(s.rate_limit_per_minute, s.redis_url, s.redis_prefix)
        self.llm = LLMStage.from_settings(s)
        try:
            self.engine = make_engine(s.db_url, s.database_wait_s, s.database_connect_timeout_s)
            self.sessions = make_sessionmaker(self.engine)
        except GeolocError as exc:
            self.db_error = exc.detail
        await anyio.to_thread.run_sync(self.check_database)
        if injected is not None:
            self._set_locator(injected, swapped=False)
            self._model = injected.model
        else:
            await anyio.to_thread.run_sync(self._load_initial)
        if self.locator is not None:
            await anyio.to_thread.run_sync(self.locator.geocoder.warm)
        await self.batcher.start()
        if s.index_poll_s > 0:
            self._task = asyncio.create_task(self._poll_loop(), name="geoloc-index-poll")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._poke.set()
            try:
                # At most one index load is in flight; past that, give up on it.
                await asyncio.wait_for(self._task, timeout=60)
            except (TimeoutError, asyncio.CancelledError):
                log.warning("the index poller did not stop in time")
        await self.batcher.stop()
        if self.limiter is not None:
            await self.limiter.close()
            self.limiter = None
        if self.llm is not None:
            await self.llm.aclose()
            self.llm = None
        if self.engine is not None:
            self.engine.dispose()
        self._task = None

    def poke(self) -> None:
        """Check the active index version now rather than at the next poll (any thread)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._poke.set)

    def begin_drain(self) -> None:
        """Stop reporting ready (called from the SIGTERM handler: sets a flag, nothing else)."""
        self.draining = True

    # -- database -------------------------------------------------------------------------------
    def database_failed(self, exc: SQLAlchemyError) -> None:
        """A request lost the database: report not ready and stop trying it per request until
        the poller's next check finds it back."""
        if isinstance(exc, OperationalError | InterfaceError):
            self.db_error = error_line(exc)

    def check_database(self) -> None:
        if self.engine is None:
            return
        try:
            # First: readiness means "can store", not only "can read"; and a SQLite file that
            # cannot be written is found without touching it (see db.session).
            check_writable(self.engine)
            check_at_head(self.engine)
            if self.db_error is not None:
                log.info("database %s is at head", display_url(self.engine.url))
            self.db_error = None
        except GeolocError as exc:
            self.db_error = exc.detail
        except SQLAlchemyError as exc:
            self.db_error = error_line(exc)

    # -- index ----------------------------------------------------------------------------------
    def _served_name(self) -> str:
        return self.locator.index.manifest.name if self.locator else self.settings.default_index

    def _active_version(self) -> str | None:
        """The version the database names for the served index; None: no opinion."""
        if self.settings.index_version or self.sessions is None or self.db_error is not None:
            return None  # a pinned version wins; no usable database, no activation
        try:
            with self.sessions() as session:
                row = active_index_version(session, self._served_name())
        except SQLAlchemyError as exc:
            log.warning("cannot read the active index version: %s", exc)
            return None
        return row.version if row is not None else None

    def _load_initial(self) -> None:
        try:
            self._model = self._model or load_geomodel(self.settings)
            locator = load_locator(
                self.settings, model=self._model, index_version=self._active_version()
            )
        except (GeolocError, ValueError, OSError) as exc:
            if self.locator_error != str(exc):
                log.error("cannot load the model or index (will retry): %s", exc)
            self.locator_error = str(exc)
            return
        self._set_locator(locator, swapped=False)

    def _set_locator(self, locator: Locator, *, swapped: bool) -> None:
        self.locator = locator
        self.locator_error = None
        self.metrics.set_index(locator.index_label)
        if swapped:
            self.metrics.index_swaps.inc()

    def refresh_index(self) -> None:
        """Load and swap in the active version if it differs from the served one.

        Runs off the request path (a thread). A failed load is logged once per version and the
        served index stays.
        """
        current = self.locator
        if current is None:
            self._load_initial()
            return
        version = self._active_version()
        if version is None or version == current.index.manifest.version:
            return
        try:
            index = load_index(
                self.settings.index_dir,
                current.index.manifest.name,
                version,
                profile=current.model.profile,
                dim=current.model.embed_dim,
                weights=current.model.weights_id,
                verify=True,
            )
            fresh = Locator(
                current.model,
                index,
                current.geocoder,
                neighbours=current.neighbours,
                calibration=calibration_for(self.settings, index, current.model),
                abstain_below=self.settings.abstain_below,
            )
        except (GeolocError, ValueError, OSError) as exc:
            if self._failed_version != version:
                log.error(
                    "cannot load index %s/%s; still serving %s: %s",
                    current.index.manifest.name,
                    version,
                    current.index_label,
                    exc,
                )
                self._failed_version = version
            return
        self._failed_version = None
        self._set_locator(fresh, swapped=True)
        log.info("now serving index %s (was %s)", fresh.index_label, current.index_label)

    async def _poll_loop(self) -> None:
        # Stopped by a flag, not by cancellation alone: a cancel that lands while a worker
        # thread runs could be lost, and then shutdown would wait forever.
        loop = asyncio.get_running_loop()
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.settings.index_poll_s)
            self._poke.clear()
            if self._stopping:
                return
            try:
                # Every round, not only after a failure: readiness must notice a database
                # that went away while no request needed it.
                await loop.run_in_executor(None, self.check_database)
                await loop.run_in_executor(None, self.refresh_index)
            except Exception:  # never let the poller die
                log.exception("index poll failed")


def build_state(settings: Settings) -> ServiceState:
    metrics = Metrics()
    size = settings.batch_max_size if settings.batching_enabled else 1
    batcher = MicroBatcher(
        max_size=size,
        max_wait_ms=settings.batch_max_wait_ms if settings.batching_enabled else 0.0,
        queue_max=settings.queue_max,
        on_batch=metrics.batch_size.observe,
    )
    metrics.track_queue(lambda: batcher.depth)
    return ServiceState(settings=settings, metrics=metrics, batcher=batcher)
