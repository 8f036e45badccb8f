"""What each HTTP endpoint does, without HTTP: the routes in service/api/routes/ parse the request
and call exactly one function here (locating), in records.py (predictions, feedback, stats) or
in instance.py (info, readiness, index activation); their names are importable from here too.

Locate records a prediction row when it can. When the database is unavailable (down, or its
schema not at head) the answer still comes, with ``prediction_id`` null and a warning: the
location is what the caller asked for, the record is bookkeeping.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import anyio
from PIL import Image
from sqlalchemy.exc import SQLAlchemyError

from encoders import get_profile
from index.geo import BBox, GeoError
from service import db
from service.api.instance import activate_index, readiness, service_info
from service.api.problems import (
    AlbumTooSmallError,
    InvalidBase64Error,
    Problem,
    UrlFetchDisabledError,
    problem_dict,
)
from service.api.records import StatsQuery, prediction_view, stats, submit_feedback
from service.api.runtime import ServiceState
from service.api.schemas import (
    AlbumImageOut,
    AlbumResponse,
    BatchItem,
    BatchResponse,
    LocateRequestOptions,
    LocateResponse,
)
from service.api.urlfetch import fetch_image
from service.config import Settings
from service.engine.album import AlbumResult
from service.engine.images import decode_image, image_text
from service.engine.llm_stages import LLMReport
from service.engine.llm_stages import skipped as llm_skipped
from service.engine.locator import LocateResult, Locator
from service.engine.options import AlbumConfig, LocateOptions, text_query
from service.errors import GeolocError, ImageTooLargeError, InvalidOptionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """Who is asking: the API key (when auth is on) and the client address."""

    key_id: int | None
    client: str | None


# -- options and inputs ---------------------------------------------------------------------------


def locate_options(settings: Settings, opts: LocateRequestOptions | None) -> LocateOptions:
    """Request options -> validated pipeline options (InvalidOptionError -> 422)."""
    opts = opts or LocateRequestOptions()
    try:
        bbox = BBox.parse(opts.bbox) if opts.bbox else None
    except GeoError as exc:
        raise InvalidOptionError(str(exc)) from None
    return settings.locate_options(
        top_k=opts.top_k,
        refine=opts.refine,
        diversify=opts.diversify,
        verify=opts.verify,
        region_share=opts.region_share,
        bbox=bbox,
        countries=tuple(c.upper() for c in opts.countries) if opts.countries else None,
        neighbours=opts.neighbours,
        return_neighbours=opts.return_neighbours,
        nprobe=opts.nprobe,
        rerank_k=opts.rerank_k,
        llm_diversify=opts.llm_diversify,
        llm_rerank=opts.llm_rerank,
    )


_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Standard or URL-safe base64 (whitespace and a data: URL prefix allowed) -> bytes."""
    try:
        raw = _WHITESPACE.sub(b"", _DATA_URL.sub("", text, count=1).encode("ascii"))
    except UnicodeEncodeError:
        raise InvalidBase64Error("image_base64 is not valid base64 (non-ASCII text)") from None
    if len(raw) > (max_bytes + 2) // 3 * 4:
        raise ImageTooLargeError(
            f"the base64 image decodes to more than {max_bytes} bytes (GEOLOC_MAX_IMAGE_BYTES)"
        )
    raw = raw.replace(b"-", b"+").replace(b"_", b"/") + b"=" * (-len(raw) % 4)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBase64Error("image_base64 is not valid base64") from None


# -- locate ---------------------------------------------------------------------------------------


def locate_response(
    result: LocateResult,
    prediction_id: str | None,
    warnings: list[str],
    llm: LLMReport | None = None,
) -> LocateResponse:
    d = result.to_dict()
    return LocateResponse(
        prediction_id=prediction_id,
        profile=result.profile,
        purpose=get_profile(result.profile).purpose,
        index_version=result.index,
        candidates=d["candidates"],
        region=d["region"],
        countries=d["countries"],
        stages=d["stages"],
        timings_ms=d["timings_ms"],
        localizability=d["localizability"],
        neighbours=d.get("neighbours"),
        llm=llm,
        warnings=warnings,
    )


def _record(
    state: ServiceState,
    response: LocateResponse,
    latency_ms: float,
    caller: Caller,
    prediction_id: str | None = None,
    body: dict[str, Any] | None = None,
) -> str | None:
    """Store the answer (as ``body`` when given); None (and a log line) when the database
    cannot take it."""
    if state.sessions is None or state.db_error is not None:
        return None
    if body is None:
        body = response.model_dump(mode="json", exclude={"prediction_id", "warnings"})
    try:
        with state.sessions() as session:
            return db.record_prediction(
                session,
                profile=response.profile,
                index_version=response.index_version,
                result=body,
                latency_ms=latency_ms,
                api_key_id=caller.key_id,
                client=caller.client,
                prediction_id=prediction_id,
            )
    except SQLAlchemyError as exc:
        log.error("prediction not recorded: %s", exc)
        state.metrics.prediction_write_failures.inc()
        state.database_failed(exc)
        return None


async def locate_bytes(
    state: ServiceState,
    data: bytes,
    options: LocateOptions,
    caller: Caller,
    *,
    name: str = "image",
    filename: str | None = None,
    locator: Locator | None = None,
) -> LocateResponse:
    """Decode, locate (through the micro-batcher), run the LLM stages when configured, and
    record one image. ``filename`` is the client's name for the file (LLM context only)."""
    start = time.perf_counter()
    # Chosen now so that the LLM's debug log lines carry it.
    prediction_id = uuid.uuid4().hex
    # Read once: an index swap does not affect a request that has started.
    locator = locator or state.require_locator()
    s = state.settings
    image = await anyio.to_thread.run_sync(lambda: decode_image(data, s.image_limits(), name=name))
    llm = state.llm
    use_llm = llm is not None and llm.wanted(options)
    first_options = llm.first_pass_options(options) if llm is not None and use_llm else options
    result = await state.batcher.submit(
        locator, image, first_options, timeout_s=s.request_timeout_s
    )
    warnings: list[str] = []
    if llm is None:
        report = llm_skipped("no LLM is configured (GEOLOC_LLM_BASE_URL is empty)")
    else:
        # The LLM stages end by the request's deadline, and within their own budget.
        deadline = time.monotonic() + min(
            s.llm_budget_s, s.request_timeout_s - (time.perf_counter() - start)
        )
        metadata = [("filename", filename)] if filename else []
        if use_llm:  # EXIF and PNG text are read only for a prompt that may use them
            metadata += await anyio.to_thread.run_sync(image_text, data)
        result, report = await llm.run(
            locator,
            image,
            result,
            options,
            metadata=metadata,
            prediction_id=prediction_id,
            deadline=deadline,
        )
        if report.status == "failed":
            warnings.append(f"the LLM stages failed ({report.reason}); the answer is without them")
    return await _answer(state, result, caller, start, prediction_id, warnings, report)


_NOT_RECORDED = (
    "the prediction was not recorded (database unavailable): no prediction_id, "
    "so no feedback can be sent for it"
)


async def _answer(
    state: ServiceState,
    result: LocateResult,
    caller: Caller,
    start: float,
    prediction_id: str,
    warnings: list[str],
    llm: LLMReport,
) -> LocateResponse:
    """The response, recorded as prediction ``prediction_id`` when the database can."""
    state.metrics.observe(result.timings_ms, result.localizability)
    response = locate_response(result, None, warnings, llm)
    latency_ms = (time.perf_counter() - start) * 1000
    recorded = await anyio.to_thread.run_sync(
        _record, state, response, latency_ms, caller, prediction_id
    )
    if recorded is None:
        response.warnings.append(_NOT_RECORDED)
    response.prediction_id = recorded
    return response


async def locate_text(
    state: ServiceState, text: str, options: LocateOptions, caller: Caller
) -> LocateResponse:
    """Locate a description of a place (profiles with a text tower; else 422)."""
    start = time.perf_counter()
    text = text_query(text, state.settings.max_text_chars)
    locator = state.require_locator()
    results = await anyio.to_thread.run_sync(locator.locate_texts, [text], options)
    report = llm_skipped("text queries do not use the LLM stages")
    return await _answer(state, results[0], caller, start, uuid.uuid4().hex, [], report)


async def locate_batch(
    state: ServiceState,
    files: list[tuple[str | None, bytes]],
    options: LocateOptions,
    caller: Caller,
    *,
    instance: str,
) -> BatchResponse:
    """Locate every file; a bad one gets a problem object and does not fail the others.

    All items use the same Locator, so one batch answer names one index version."""
    locator = state.require_locator()

    async def one(i: int, filename: str | None, data: bytes) -> BatchItem:
        try:
            name = filename or f"file {i}"
            res = await locate_bytes(
                state, data, options, caller, name=name, filename=filename, locator=locator
            )
            return BatchItem(index=i, filename=filename, result=res)
        except GeolocError as exc:
            state.metrics.problems.labels(exc.type).inc()
            problem = Problem.model_validate(problem_dict(exc, f"{instance}#{i}"))
            return BatchItem(index=i, filename=filename, problem=problem)

    items = await asyncio.gather(*(one(i, n, d) for i, (n, d) in enumerate(files)))
    ok = sum(item.result is not None for item in items)
    return BatchResponse(items=list(items), succeeded=ok, failed=len(items) - ok)


def album_response(
    result: AlbumResult,
    filenames: list[str | None],
    used: list[int],
    problems: dict[int, Problem],
    warnings: list[str],
    llm: LLMReport,
) -> AlbumResponse:
    """The body of POST /v1/locate/album (prediction ids unset): the joint answer, then one
    item per picture sent (``filenames``), in order; the pictures at ``used`` are those
    ``result`` located, the others have their ``problems``."""
    joint = locate_response(result.joint, None, warnings, llm)
    parts = dict(zip(used, result.parts(), strict=True))
    own = dict(zip(used, result.images, strict=True))
    items = [
        AlbumImageOut(
            index=i,
            filename=name,
            result=locate_response(own[i], None, [], llm),
            **parts[i],
        )
        if i in own
        else AlbumImageOut(
            index=i, filename=name, weight=0.0, agreement=None, outlier=False, problem=problems[i]
        )
        for i, name in enumerate(filenames)
    ]
    return AlbumResponse(
        **joint.model_dump(), images=items, used=len(used), spread_km=result.spread_km
    )


async def locate_album(
    state: ServiceState,
    files: list[tuple[str | None, bytes | str]],
    options: LocateOptions,
    config: AlbumConfig,
    caller: Caller,
    *,
    instance: str,
) -> AlbumResponse:
    """Locate pictures of one place jointly (``Locator.locate_album``, in the model thread).

    A picture that cannot be read gets its problem and the album answers from the others when
    at least two remain (saying so in ``warnings``); else 422 ``album-too-small``. Each
    picture's own answer is recorded as a prediction, then the joint answer, whose stored body
    names them and their weights. Base64 text (the JSON form) is decoded per picture."""
    start = time.perf_counter()
    locator = state.require_locator()
    s = state.settings

    def decode_all() -> tuple[list[Image.Image], list[int], dict[int, Problem]]:
        images, used, problems = [], [], {}
        for i, (filename, data) in enumerate(files):
            try:
                raw = decode_base64(data, s.max_image_bytes) if isinstance(data, str) else data
                images.append(decode_image(raw, s.image_limits(), name=filename or f"picture {i}"))
                used.append(i)
            except GeolocError as exc:
                state.metrics.problems.labels(exc.type).inc()
                problems[i] = Problem.model_validate(problem_dict(exc, f"{instance}#{i}"))
        return images, used, problems

    images, used, problems = await anyio.to_thread.run_sync(decode_all)
    lost = "; ".join(f"#{i}: {p.detail}" for i, p in problems.items())
    if len(images) < 2:
        raise AlbumTooSmallError(
            f"an album needs at least 2 pictures that can be read; {len(images)} of "
            f"{len(files)} could" + (f" ({lost})" if lost else "")
        )
    result = await state.batcher.submit_album(
        locator, images, options, config, timeout_s=s.request_timeout_s
    )
    report = llm_skipped("albums do not use the LLM stages")
    warnings = []
    if problems:
        warnings.append(
            f"{len(problems)} of {len(files)} pictures could not be used ({lost}); the album "
            f"answers from the other {len(images)}"
        )
    names = [filename for filename, _ in files]
    album = album_response(result, names, used, problems, warnings, report)
    state.metrics.observe(result.joint.timings_ms, result.joint.localizability)

    def record_all() -> None:
        """Each picture's own answer, then the joint one, whose body names them."""
        latency_ms = (time.perf_counter() - start) * 1000
        for item in album.images:
            if item.result is not None:
                item.result.prediction_id = _record(
                    state, item.result, latency_ms, caller, uuid.uuid4().hex
                )
                if item.result.prediction_id is None:
                    item.result.warnings.append(_NOT_RECORDED)
        body = album.model_dump(
            mode="json", exclude={"prediction_id", "warnings", "images", "used", "spread_km"}
        )
        body["album"] = {
            "used": album.used,
            "spread_km": album.spread_km,
            "images": [
                {
                    **item.model_dump(mode="json", exclude={"result", "problem"}),
                    "prediction_id": item.result.prediction_id if item.result else None,
                    "problem": item.problem.type if item.problem else None,
                }
                for item in album.images
            ],
        }
        album.prediction_id = _record(state, album, latency_ms, caller, uuid.uuid4().hex, body)

    await anyio.to_thread.run_sync(record_all)
    if album.prediction_id is None:
        album.warnings.append(_NOT_RECORDED)
    return album


async def locate_url(
    state: ServiceState, url: str, options: LocateOptions, caller: Caller
) -> LocateResponse:
    s = state.settings
    if not s.url_fetch_enabled:
        raise UrlFetchDisabledError(
            "fetching images by URL is turned off on this service (GEOLOC_URL_FETCH_ENABLED)"
        )
    state.require_locator()
    data = await fetch_image(url, max_bytes=s.max_image_bytes, timeout_s=s.url_fetch_timeout_s)
    return await locate_bytes(state, data, options, caller, name="the fetched image")


__all__ = [
    "Caller",
    "StatsQuery",
    "activate_index",
    "album_response",
    "decode_base64",
    "locate_album",
    "locate_batch",
    "locate_bytes",
    "locate_options",
    "locate_text",
    "locate_url",
    "prediction_view",
    "readiness",
    "service_info",
    "stats",
    "submit_feedback",
]
