"""The OpenAPI document: what the routes declare that depends on the settings (the security
requirement and the auth problems when GEOLOC_AUTH_ENABLED, the batch size), the request
bodies the routes read themselves, and the schemas and security schemes added to the
generated document. Also the pages that show it, ``/docs`` (Swagger UI) and ``/redoc``
(ReDoc), with their scripts from the built static folder rather than a CDN (webpage.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.responses import HTMLResponse

from service.api import schemas, webpage
from service.api.problems import (
    PROBLEM_BASE,
    PROBLEM_MEDIA_TYPE,
    ForbiddenError,
    NotReadyError,
    Problem,
    RateLimitedError,
    UnauthorizedError,
    UrlFetchDisabledError,
    UrlRefusedError,
    problem_dict,
)
from service.api.schemas import AlbumJSONRequest, LocateJSONRequest
from service.config import Settings
from service.errors import (
    DeadlineExceededError,
    GeolocError,
    ImageTooLargeError,
    InvalidOptionError,
    NotFoundError,
    UnsupportedMediaError,
)


@dataclass(frozen=True)
class RouteDocs:
    """The settings-dependent parts of a route's OpenAPI declaration."""

    auth_enabled: bool
    max_batch: int
    max_album: int

    @classmethod
    def of(cls, settings: Settings) -> RouteDocs:
        return cls(
            auth_enabled=settings.auth_enabled,
            max_batch=settings.max_batch,
            max_album=settings.max_album,
        )

    @property
    def secured(self) -> dict[str, Any]:
        """``openapi_extra=`` of a route that takes an API key."""
        return {"security": [{"bearer": []}, {"apiKey": []}]} if self.auth_enabled else {}

    @property
    def auth_errors(self) -> tuple[int, ...]:
        """The problems of the API-key check and the rate limit."""
        return (401, 403, 429) if self.auth_enabled else (429,)


MULTIPART_ONE = {
    "type": "object",
    "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary"}},
    "additionalProperties": False,
}


def multipart_many(max_files: int, min_files: int = 1) -> dict[str, Any]:
    files = {"type": "array", "items": {"type": "string", "format": "binary"}}
    return {
        "type": "object",
        "required": ["files"],
        "properties": {"files": {**files, "minItems": min_files, "maxItems": max_files}},
        "additionalProperties": False,
    }


def request_body(content: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra=`` of a route that reads its body itself."""
    return {"requestBody": {"required": True, "content": content}}


def schema_ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


#: Request options whose upper bound is a setting; the schema states the setting's value.
SETTING_MAXIMA = {
    "top_k": "max_top_k",
    "retrieve_k": "max_retrieve_k",
    "nprobe": "max_nprobe",
    "rerank_k": "max_rerank_k",
}


def _state_setting_maxima(node: Any, settings: Settings) -> None:
    """Put ``maximum`` on every integer schema of an option in SETTING_MAXIMA: body
    properties and query parameters alike (the check itself is LocateOptions.validate)."""

    def bound(schema: dict[str, Any], name: str) -> None:
        for branch in schema.get("anyOf", [schema]):
            if branch.get("type") == "integer":
                branch["maximum"] = int(getattr(settings, SETTING_MAXIMA[name]))

    if isinstance(node, dict):
        props = node.get("properties")
        if isinstance(props, dict):
            for name in SETTING_MAXIMA.keys() & props.keys():
                bound(props[name], name)
        if node.get("in") == "query" and node.get("name") in SETTING_MAXIMA:
            bound(node.get("schema") or {}, node["name"])
        for value in node.values():
            _state_setting_maxima(value, settings)
    elif isinstance(node, list):
        for value in node:
            _state_setting_maxima(value, settings)


#: Descriptions of the fields of models the API answers with but does not define (the
#: problem body of problems.py, the LLM report of engine/llm_stages.py), added to the document
#: where the model gives none: every field of every answer is described.
FIELD_DOCS: dict[str, dict[str, str]] = {
    "Problem": {
        "type": "Stable identifier of the problem type: a URI ending in its name (e.g. "
        f"{PROBLEM_BASE}rate-limited); docs/API.md lists them.",
        "title": "Short summary of the problem type (the same for every problem of a type).",
        "status": "The HTTP status code.",
        "detail": "What went wrong this time, for humans.",
        "instance": "The request path (in a batch: path#index of the file).",
    },
    "LLMReport": {
        "reason": "Why the stages were skipped or failed; null when they ran.",
        "model": "The LLM asked (GEOLOC_LLM_MODEL); null when none is configured.",
        "answered": "Calls that got an answer.",
        "elapsed_ms": "Time spent in the LLM stages, ms.",
        "diversify": "What LLM diversification did; null when it did not run.",
        "rerank": "What LLM reranking did; null when it did not run.",
    },
    "DiversifyReport": {"answered": "Answers received."},
    "Proposal": {
        "lat": "Proposed latitude, degrees.",
        "lon": "Proposed longitude, degrees.",
    },
    "RerankReport": {
        "status": "ran: the ranking was applied; skipped: no call (reason says why); failed.",
        "reason": "Why it was skipped or failed; null when it ran.",
        "shown": "Best candidates shown to the LLM (GEOLOC_LLM_RERANK_K at most).",
        "unparsable": "The answer held no ranking that could be read.",
        "weight": "w of the reranking bonus exp(w·s) (GEOLOC_LLM_RERANK_WEIGHT): at most w "
        "in log-odds between two shown candidates, whose total mass it keeps.",
    },
}

#: Examples of the models the API answers with but does not define.
MODEL_EXAMPLES: dict[str, list[dict[str, Any]]] = {
    "Problem": [
        {
            "type": f"{PROBLEM_BASE}rate-limited",
            "title": "Too many requests",
            "status": 429,
            "detail": "more than 60 requests per minute; retry in 12 s",
            "instance": "/v1/locate",
        }
    ],
}


def _titled(problem: GeolocError, title: str) -> GeolocError:
    problem.title = title  # as the handlers title the problems they make themselves
    return problem


#: The example of each status's problem+json response: one problem of that status, as the
#: handlers render it (the shared Problem example would show a 429 under every status);
#: PATH_PROBLEMS for the routes whose problem of a status is another.
STATUS_PROBLEMS: dict[str, GeolocError] = {
    "400": _titled(
        GeolocError("There was an error parsing the body", type="invalid-request", status=400),
        "Bad Request",
    ),
    "401": UnauthorizedError(
        "send an API key: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    ),
    "403": ForbiddenError("the API key lacks the 'admin' scope"),
    "404": NotFoundError("no prediction with id 'c322b8c0a06c414db6ca4a06cc2f674c'"),
    "413": ImageTooLargeError(
        "image has 31457280 bytes; the limit is 20971520 (GEOLOC_MAX_IMAGE_BYTES)"
    ),
    "415": UnsupportedMediaError("notes.txt is not a JPEG, PNG or WebP image"),
    "422": InvalidOptionError("top_k must be between 1 and 100"),
    "429": RateLimitedError("more than 60 requests per minute; retry in 12 s"),
    "500": _titled(
        GeolocError(
            "an internal error occurred (error id 3f9c2a1b7d4e); it was logged",
            type="internal-error",
            status=500,
        ),
        "Internal server error",
    ),
    "503": NotReadyError("the model or index is not loaded: no published version"),
    "504": DeadlineExceededError(
        "the image was not located within 30 s (GEOLOC_REQUEST_TIMEOUT_S)"
    ),
}
PATH_PROBLEMS: dict[str, dict[str, GeolocError]] = {
    "/v1/locate/url": {
        "400": UrlRefusedError(
            "host 'intranet.example' resolves to 10.0.0.7 (private); only public addresses "
            "are fetched"
        ),
        "404": UrlFetchDisabledError(
            "fetching images by URL is turned off on this service (GEOLOC_URL_FETCH_ENABLED)"
        ),
    },
    "/v1/admin/index/activate": {
        "404": NotFoundError(
            "index 'default-bluemarble' has no registered version '20260131-130000-000000'; "
            "known versions: ['20260131-120000-000000']; build one with `geoloc index build`"
        )
    },
}


def _problem_examples(schema: dict[str, Any]) -> None:
    for path, ops in schema.get("paths", {}).items():
        problems = {**STATUS_PROBLEMS, **PATH_PROBLEMS.get(path, {})}
        for op in ops.values():
            for status, response in op.get("responses", {}).items():
                body = response.get("content", {}).get(PROBLEM_MEDIA_TYPE)
                if body is not None and status in problems:
                    body.setdefault("example", problem_dict(problems[status], path))


def _restore_examples(components: dict[str, Any]) -> None:
    """The examples of schemas.py's models as they are written: get_openapi encodes the
    document without None values, which takes the nulls out of the examples."""
    for model in vars(schemas).values():
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        extra = model.model_config.get("json_schema_extra")
        if isinstance(extra, dict) and "examples" in extra and model.__name__ in components:
            components[model.__name__]["examples"] = extra["examples"]


def _document_foreign_models(components: dict[str, Any]) -> None:
    for name, fields in FIELD_DOCS.items():
        props = components.get(name, {}).get("properties", {})
        for field, text in fields.items():
            if field in props:
                props[field].setdefault("description", text)
    for name, examples in MODEL_EXAMPLES.items():
        if name in components:
            components[name].setdefault("examples", examples)


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """``app.openapi()``: the generated document, plus the schemas of the bodies the routes
    read themselves (Problem, LocateJSONRequest, AlbumJSONRequest), the descriptions and
    examples of models defined outside the API (FIELD_DOCS, MODEL_EXAMPLES), the limits that
    are settings
    (``maximum``) and, with auth on, the security schemes."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (Problem, LocateJSONRequest, AlbumJSONRequest):
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            _restore_examples(components)
            _document_foreign_models(components)
            _problem_examples(schema)
            if settings.auth_enabled:
                schema["components"]["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"},
                    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                }
            _state_setting_maxima(schema, settings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


DOCS_URL = "/docs"
REDOC_URL = "/redoc"
#: The docs pages may load from this origin only: ReDoc 2 shows Redocly's logo from
#: cdn.redoc.ly whatever its options say, so the browser is told not to fetch it (the logo
#: hides itself when it fails to load). Inline scripts and styles: FastAPI's page starts the
#: UI inline, and both UIs style inline; workers from blob: (ReDoc's search).
DOCS_CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "worker-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'self'",
    )
)


def install_docs(app: FastAPI, settings: Settings) -> None:
    """``/docs`` and ``/redoc`` (the app is built with ``docs_url=None, redoc_url=None``): the
    pages FastAPI makes, loading Swagger UI and ReDoc from the static folder (npm packages
    copied by ``python -m service.api.webpage build``), no web fonts, no validator badge, and a
    Content-Security-Policy (DOCS_CSP) for what the bundles would still fetch, so nothing
    leaves the machine. While the folder is incomplete they say how to build it (503),
    as ``/`` does; the document itself stays at ``/openapi.json``."""
    assets = settings.web_assets_path
    missing = webpage.missing_assets(assets)  # checked once, as for the page
    not_built = webpage.not_built_page(assets, missing) if missing else None

    def page(render: Callable[[str, str], HTMLResponse]) -> Callable[[Request], HTMLResponse]:
        def docs_page(request: Request) -> HTMLResponse:
            if not_built is not None:
                return HTMLResponse(not_built, status_code=503)
            root = str(request.scope.get("root_path", "")).rstrip("/")
            response = render(root, f"{root}{webpage.ASSETS_URL}/")
            response.headers["Content-Security-Policy"] = DOCS_CSP
            return response

        return docs_page

    def swagger(root: str, lib: str) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=lib + webpage.SWAGGER_JS,
            swagger_css_url=lib + webpage.SWAGGER_CSS,
            swagger_favicon_url=lib + webpage.DOCS_FAVICON,
            # Swagger UI would ask validator.swagger.io about the document of a public host.
            swagger_ui_parameters={"validatorUrl": None},
        )

    def redoc(root: str, lib: str) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=lib + webpage.REDOC_JS,
            redoc_favicon_url=lib + webpage.DOCS_FAVICON,
            with_google_fonts=False,
        )

    app.add_api_route(DOCS_URL, page(swagger), methods=["GET"], include_in_schema=False)
    app.add_api_route(REDOC_URL, page(redoc), methods=["GET"], include_in_schema=False)
