"""The HTTP API (FastAPI). Routes are thin: parse, then call one function in service/operations.

    uvicorn --factory service.api.main:create_app      (or: geoloc serve)

Every error is an ``application/problem+json`` body (service/api/problems.py; docs/API.md lists
the types). State lives in one ServiceState on ``app.state.service``; dependencies hand
routes what they need.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import operations as ops
from service.api.bodylimit import BodyLimitMiddleware
from service.api.metrics import MetricsMiddleware
from service.api.problems import (
    PROBLEM_MEDIA_TYPE,
    DatabaseUnavailableError,
    ForbiddenError,
    HttpProblem,
    InvalidRequestError,
    MissingImageError,
    Problem,
    TooManyImagesError,
    UnauthorizedError,
    UnsupportedContentTypeError,
    openapi_problems,
    problem_response,
)
from service.api.runtime import ServiceState, build_state
from service.api.schemas import (
    ActivateIn,
    ActivateOut,
    BatchResponse,
    FeedbackIn,
    FeedbackOut,
    HealthOut,
    InfoOut,
    LocateJSONRequest,
    LocateRequestOptions,
    LocateResponse,
    PredictionOut,
    ReadyOut,
    StatsOut,
    TextLocateRequest,
    UrlLocateRequest,
)
from service.api.webpage import PAGE_DIR, missing_assets, not_built_page
from service.config import Settings
from service.db import authenticate
from service.engine.locator import LocateOptions, Locator
from service.errors import GeolocError, InvalidOptionError

log = logging.getLogger("geoloc.http")

# -- dependencies --------------------------------------------------------------------------------


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_locator(state: StateDep) -> Locator:
    return state.require_locator()


LocatorDep = Annotated[Locator, Depends(get_locator)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.require_sessions()() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key", "").strip() or None


def _check_key(state: ServiceState, key: str, scope: str) -> int:
    with state.require_sessions()() as session:
        row = authenticate(session, key)
        if row is None:
            raise UnauthorizedError(
                "the API key is unknown or revoked",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if scope not in row.scope_set:
            raise ForbiddenError(f"the API key lacks the '{scope}' scope")
        return row.id


def require_scope(
    scope: str,
) -> Callable[[Request, ServiceState], Coroutine[Any, Any, ops.Caller]]:
    """Authenticate (when GEOLOC_AUTH_ENABLED) and rate-limit; returns who is calling."""

    async def dependency(request: Request, state: StateDep) -> ops.Caller:
        client = request.client.host if request.client else None
        key_id: int | None = None
        if state.settings.auth_enabled:
            key = _presented_key(request)
            if key is None:
                raise UnauthorizedError(
                    "send an API key: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
                )
            key_id = await anyio.to_thread.run_sync(_check_key, state, key, scope)
        elif scope == "admin":
            raise ForbiddenError(
                "admin endpoints need authentication: set GEOLOC_AUTH_ENABLED=true and use a "
                "key with the admin scope (or `geoloc index activate` on the server)"
            )
        if state.limiter is not None:
            await state.limiter.hit(f"key:{key_id}" if key_id is not None else f"ip:{client}")
        return ops.Caller(key_id=key_id, client=client)

    return dependency


LocateCaller = Annotated[ops.Caller, Depends(require_scope("locate"))]
AdminCaller = Annotated[ops.Caller, Depends(require_scope("admin"))]
QueryOptions = Annotated[LocateRequestOptions, Query()]
PredictionId = Annotated[str, Path(min_length=1, max_length=64)]


def _invalid_request(exc: ValidationError, where: str) -> RequestValidationError:
    return RequestValidationError(
        [{**e, "loc": (where, *e["loc"])} for e in exc.errors(include_url=False)]
    )


async def _read_upload(upload: UploadFile, limit: int) -> bytes:
    # One byte over the limit is enough for decode_image to refuse it by size.
    return await upload.read(limit + 1)


@dataclass(frozen=True)
class ImageInput:
    data: bytes
    filename: str | None
    options: LocateOptions


def _only_fields(form: FormData, name: str) -> None:
    unknown = sorted({key for key in form if key != name})
    if unknown:
        raise InvalidRequestError(
            f"unexpected multipart field(s) {unknown[:5]}; send only '{name}' "
            "(options go in the query string)"
        )


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_image_input(
    request: Request, settings: SettingsDep, query: QueryOptions
) -> ImageInput:
    """The one image of /v1/locate: multipart ``file`` or JSON ``image_base64``.

    Options come from the query string; in a JSON body they may also be body fields (which win).
    """
    ctype = _content_type(request)
    if ctype == "application/json" or ctype.endswith("+json"):
        raw = await request.body()
        try:
            body = LocateJSONRequest.model_validate_json(raw)
        except ValidationError as exc:
            raise _invalid_request(exc, "body") from None
        merged = {**query.model_dump(exclude_none=True), **body.model_dump(exclude_none=True)}
        merged.pop("image_base64")
        opts = ops.locate_options(settings, LocateRequestOptions(**merged))
        data = ops.decode_base64(body.image_base64, settings.max_image_bytes)
        return ImageInput(data=data, filename=None, options=opts)
    if ctype == "multipart/form-data":
        opts = ops.locate_options(settings, query)
        async with request.form(max_files=16, max_fields=64) as form:
            files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
            if not files:
                raise MissingImageError("send the image as the multipart field 'file'")
            _only_fields(form, "file")
            if len(files) > 1:
                raise MissingImageError(
                    "one 'file' per request; send several to POST /v1/locate/batch as 'files'",
                    type="too-many-images",
                )
            data = await _read_upload(files[0], settings.max_image_bytes)
            return ImageInput(data=data, filename=files[0].filename, options=opts)
    raise UnsupportedContentTypeError(
        f"send multipart/form-data (field 'file') or application/json (image_base64), "
        f"not {ctype or 'no content type'!r}"
    )


ImageDep = Annotated[ImageInput, Depends(read_image_input)]


def _instant(name: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidOptionError(
            f"{name} must be an ISO 8601 date-time such as 2026-01-31T12:00:00Z, not {text!r}"
        ) from None


def stats_query(
    since: Annotated[
        str | None,
        Query(
            description="ISO 8601 date or date-time (UTC unless it has an offset); only "
            "predictions made since then.",
            json_schema_extra={"format": "date-time"},
            max_length=64,
        ),
    ] = None,
    until: Annotated[
        str | None,
        Query(
            description="ISO 8601 date or date-time; only predictions made before then.",
            json_schema_extra={"format": "date-time"},
            max_length=64,
        ),
    ] = None,
    within_km: Annotated[
        float | None,
        Query(
            gt=0,
            le=20_000,
            description="Calibration event: the top-1 answer within this many km; default "
            "GEOLOC_CALIBRATION_KM.",
        ),
    ] = None,
    bins: Annotated[int, Query(ge=1, le=100, description="Reliability bins.")] = 10,
) -> ops.StatsQuery:
    return ops.StatsQuery(
        since=_instant("since", since),
        until=_instant("until", until),
        within_km=within_km,
        bins=bins,
    )


StatsQueryDep = Annotated[ops.StatsQuery, Depends(stats_query)]


async def read_batch_input(
    request: Request, settings: SettingsDep, query: QueryOptions
) -> tuple[list[tuple[str | None, bytes]], LocateOptions]:
    if _content_type(request) != "multipart/form-data":
        raise UnsupportedContentTypeError(
            "send the images as multipart/form-data, each in a field named 'files'"
        )
    opts = ops.locate_options(settings, query)
    # The parser's own limits (400 beyond them) sit above ours, so that a few files too many
    # get the clearer too-many-images problem.
    async with request.form(max_files=settings.max_batch + 16, max_fields=64) as form:
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not files:
            raise MissingImageError("send the images as multipart fields named 'files'")
        _only_fields(form, "files")
        if len(files) > settings.max_batch:
            raise TooManyImagesError(
                f"at most {settings.max_batch} images per batch (GEOLOC_MAX_BATCH)"
            )
        return [(f.filename, await _read_upload(f, settings.max_image_bytes)) for f in files], opts


BatchDep = Annotated[
    tuple[list[tuple[str | None, bytes]], LocateOptions], Depends(read_batch_input)
]


# -- exception handlers ---------------------------------------------------------------------------


async def geoloc_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GeolocError)
    return problem_response(exc, request.url.path)


async def validation_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")), "type": e.get("type")}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(first["loc"]) or "request"
    problem = InvalidRequestError(
        f"{where}: {first['msg']}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
        extensions={"errors": errors},
    )
    return problem_response(problem, request.url.path)


_HTTP_TYPES = {
    400: "invalid-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    413: "request-too-large",
    415: "unsupported-content-type",
}


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail else phrase
    problem = HttpProblem(
        detail,
        type=_HTTP_TYPES.get(status, f"http-{status}"),
        status=status,
        headers=dict(exc.headers or {}),
    )
    problem.title = phrase
    return problem_response(problem, request.url.path)


async def database_error_handler(request: Request, exc: Exception) -> Response:
    log.warning("database error on %s: %s", request.url.path, exc)
    if isinstance(exc, SQLAlchemyError):  # /readyz reports it until the poller finds it back
        request.app.state.service.database_failed(exc)
    problem = DatabaseUnavailableError(
        "the database did not answer; retry shortly", headers={"Retry-After": "5"}
    )
    return problem_response(problem, request.url.path)


async def unhandled_error_handler(request: Request, exc: Exception) -> Response:
    error_id = uuid.uuid4().hex[:12]
    log.error("unhandled error %s on %s", error_id, request.url.path, exc_info=exc)
    problem = HttpProblem(
        f"an internal error occurred (error id {error_id}); it was logged",
        type="internal-error",
        status=500,
    )
    problem.title = "Internal server error"
    return problem_response(problem, request.url.path)


# -- the app --------------------------------------------------------------------------------------


class ReplicaHeaderMiddleware:
    """Adds ``X-Geoloc-Replica: <name>`` to every response: behind a load balancer, which
    replica answered is the first thing to know about a request that went wrong."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app = app
        self.header = (b"x-geoloc-replica", name.encode("ascii", "replace"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


_MULTIPART_ONE = {
    "type": "object",
    "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary"}},
    "additionalProperties": False,
}


def _multipart_many(max_batch: int) -> dict[str, Any]:
    files = {"type": "array", "items": {"type": "string", "format": "binary"}}
    return {
        "type": "object",
        "required": ["files"],
        "properties": {"files": {**files, "minItems": 1, "maxItems": max_batch}},
        "additionalProperties": False,
    }


def _body(content: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": content}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def add_web_page(app: FastAPI, settings: Settings) -> None:
    """The page at ``/``: our files under /web, the built libraries and base map under /web/lib.

    Without built assets the service still starts; ``/`` then says how to build them.
    """
    assets = settings.web_assets_path
    # Checked once: assets built later are served after a restart (the page says so).
    missing = missing_assets(assets)
    not_built = not_built_page(assets, missing) if missing else None

    @app.get("/", include_in_schema=False)
    def web_page() -> Response:
        if not_built is not None:
            return HTMLResponse(not_built, status_code=503)
        return FileResponse(PAGE_DIR / "index.html", media_type="text/html")

    if not missing:  # mounted first: /web would otherwise take /web/lib/... too
        app.mount("/web/lib", StaticFiles(directory=assets), name="web-lib")
    app.mount("/web", StaticFiles(directory=PAGE_DIR), name="web")


def create_app(settings: Settings | None = None, *, locator: Locator | None = None) -> FastAPI:
    """The ASGI app. The lifespan loads the Locator (unless one is given), the database and
    the micro-batcher, and starts the index poller."""
    settings = settings or Settings()
    state = build_state(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start(locator)
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="geoloc",
        version="0.1.0",
        summary="Image geolocation: ranked GPS candidates with probabilities, H3 cells, "
        "place names and an uncertainty region.",
        lifespan=lifespan,
    )
    app.state.service = state
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(ReplicaHeaderMiddleware, name=settings.replica_name or socket.gethostname())
    app.add_exception_handler(GeolocError, geoloc_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(SQLAlchemyError, database_error_handler)
    app.add_exception_handler(Exception, unhandled_error_handler)

    secured: dict[str, Any] = (
        {"security": [{"bearer": []}, {"apiKey": []}]} if settings.auth_enabled else {}
    )
    auth_errors = (401, 403, 429) if settings.auth_enabled else (429,)
    locate_body = _body(
        {
            "multipart/form-data": {"schema": _MULTIPART_ONE},
            "application/json": {"schema": _ref(LocateJSONRequest)},
        }
    )

    async def locate(caller: LocateCaller, image: ImageDep, state: StateDep) -> LocateResponse:
        """Locate one image: multipart field `file`, or JSON with `image_base64`.

        Options are query parameters (for JSON also body fields). The answer names the one
        index version used and the prediction id for feedback.
        """
        return await ops.locate_bytes(
            state,
            image.data,
            image.options,
            caller,
            name=image.filename or "image",
            filename=image.filename,
        )

    locate_errors = openapi_problems(400, *auth_errors, 413, 415, 422, 500, 503, 504)
    for path, op_id in (("/v1/locate", "locate_v1"), ("/locate", "locate")):
        app.add_api_route(
            path,
            locate,
            methods=["POST"],
            response_model=LocateResponse,
            operation_id=op_id,
            summary="Locate one image",
            tags=["locate"],
            responses=locate_errors,
            openapi_extra={**locate_body, **secured},
        )

    @app.post(
        "/v1/locate/batch",
        operation_id="locate_batch",
        tags=["locate"],
        responses=openapi_problems(400, *auth_errors, 413, 415, 422, 500, 503),
        openapi_extra={
            **_body({"multipart/form-data": {"schema": _multipart_many(settings.max_batch)}}),
            **secured,
        },
    )
    async def locate_batch(
        request: Request, caller: LocateCaller, batch: BatchDep, state: StateDep
    ) -> BatchResponse:
        """Locate several images (multipart fields `files`, at most GEOLOC_MAX_BATCH).

        Each item carries a result or a problem object: a bad image fails only itself.
        """
        files, options = batch
        return await ops.locate_batch(state, files, options, caller, instance=request.url.path)

    @app.post(
        "/v1/locate/url",
        operation_id="locate_url",
        tags=["locate"],
        responses=openapi_problems(400, *auth_errors, 404, 413, 415, 422, 500, 503, 504),
        openapi_extra=secured,
    )
    async def locate_url(
        caller: LocateCaller, body: UrlLocateRequest, settings: SettingsDep, state: StateDep
    ) -> LocateResponse:
        """Fetch an image by http(s) URL and locate it (off unless GEOLOC_URL_FETCH_ENABLED).

        Only public addresses are fetched; at most 3 redirects, each checked again.
        """
        options = ops.locate_options(settings, body.options)
        return await ops.locate_url(state, body.url, options, caller)

    @app.post(
        "/v1/locate/text",
        operation_id="locate_text",
        tags=["locate"],
        responses=openapi_problems(400, *auth_errors, 413, 422, 500, 503),
        openapi_extra=secured,
    )
    async def locate_text(
        caller: LocateCaller, body: TextLocateRequest, settings: SettingsDep, state: StateDep
    ) -> LocateResponse:
        """Locate a description of a place, e.g. `{"text": "a sandy beach with palm trees"}`.

        Only for profiles with a text tower (`geoclip`: CLIP's text encoder into GeoCLIP's image
        head); others answer 422 `text-not-supported`. Options are body fields.
        """
        opts = LocateRequestOptions(**body.model_dump(exclude={"text"}, exclude_none=True))
        options = ops.locate_options(settings, opts)
        return await ops.locate_text(state, body.text, options, caller)

    @app.get(
        "/v1/predictions/{prediction_id}",
        operation_id="get_prediction",
        tags=["predictions"],
        responses=openapi_problems(*auth_errors, 404, 422, 500, 503),
        openapi_extra=secured,
    )
    def get_prediction(
        caller: LocateCaller, prediction_id: PredictionId, session: SessionDep
    ) -> PredictionOut:
        """A recorded prediction: the answer as it was returned."""
        return ops.prediction_view(session, prediction_id)

    @app.post(
        "/v1/predictions/{prediction_id}/feedback",
        operation_id="add_feedback",
        tags=["predictions"],
        responses=openapi_problems(400, *auth_errors, 404, 413, 422, 500, 503),
        openapi_extra=secured,
    )
    def add_feedback(
        caller: LocateCaller, prediction_id: PredictionId, body: FeedbackIn, session: SessionDep
    ) -> FeedbackOut:
        """The true location of a predicted image; a second call replaces the first."""
        return ops.submit_feedback(session, prediction_id, body.lat, body.lon)

    @app.get(
        "/v1/stats",
        operation_id="stats",
        tags=["predictions"],
        responses=openapi_problems(*auth_errors, 422, 500, 503),
        openapi_extra=secured,
    )
    def get_stats(
        caller: LocateCaller, session: SessionDep, state: StateDep, query: StatsQueryDep
    ) -> StatsOut:
        """Prediction counts and, over the predictions with feedback made in the window
        [since, until), the metrics of `geoloc eval`: distance table, GeoScore,
        Recall-vs-Area of the returned regions, calibration (ECE) of the top-1 probability;
        and this process's request counts."""
        return ops.stats(session, state.metrics, state.settings, query)

    @app.post(
        "/v1/admin/index/activate",
        operation_id="activate_index",
        tags=["admin"],
        responses=openapi_problems(400, 401, 403, 404, 413, 422, 429, 500, 503),
        openapi_extra=secured,
    )
    def activate_index(
        caller: AdminCaller, body: ActivateIn, session: SessionDep, state: StateDep
    ) -> ActivateOut:
        """Make NAME/VERSION the served version; every replica swaps to it within
        GEOLOC_INDEX_POLL_S. Needs auth on and a key with the admin scope."""
        return ops.activate_index(state, session, body.name, body.version)

    @app.get(
        "/v1/info",
        operation_id="info",
        tags=["service"],
        responses=openapi_problems(500, 503),
    )
    def info(locator: LocatorDep, settings: SettingsDep) -> InfoOut:
        """The model profile (and what it locates), the served index, and the limits."""
        return ops.service_info(settings, locator)

    @app.get("/healthz", operation_id="healthz", tags=["service"])
    def healthz() -> HealthOut:
        """200 while the process runs."""
        return HealthOut(status="ok")

    @app.get(
        "/readyz",
        operation_id="readyz",
        tags=["service"],
        responses=openapi_problems(500, 503),
    )
    def readyz(state: StateDep) -> ReadyOut:
        """200 when the model, the index and the database (schema at head) are ready."""
        return ops.readiness(state)

    @app.get(
        "/metrics",
        operation_id="metrics",
        tags=["service"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    def metrics(state: StateDep) -> Response:
        """Prometheus metrics of this process."""
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    add_web_page(app, settings)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (Problem, LocateJSONRequest):
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            if settings.auth_enabled:
                schema["components"]["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"},
                    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


__all__ = ["PROBLEM_MEDIA_TYPE", "create_app"]
