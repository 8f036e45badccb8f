"""HTTP problem details (RFC 9457): the errors only the web service raises, and the rendering.

Every error a client can get is a ``GeolocError`` (service/errors.py or below); the app has one
handler that renders it as ``application/problem+json``. Errors here may carry response headers
(``Retry-After``, ``WWW-Authenticate``) and extension members (``checks`` of /readyz).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse

from service.errors import DatabaseUnavailableError as DatabaseUnavailableError  # re-exported
from service.errors import GeolocError

PROBLEM_BASE = "https://geoloc.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


class Problem(BaseModel):
    """The problem+json body: ``type`` is stable, ``detail`` is for humans."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None


class HttpProblem(GeolocError):
    """A GeolocError that only the HTTP layer raises (body, auth, rate and load limits)."""


class InvalidRequestError(HttpProblem):
    type, status, title = "invalid-request", 422, "Invalid request"


class RequestTooLargeError(HttpProblem):
    type, status, title = "request-too-large", 413, "Request too large"


class UnsupportedContentTypeError(HttpProblem):
    type, status, title = "unsupported-content-type", 415, "Unsupported content type"


class InvalidBase64Error(HttpProblem):
    type, status, title = "invalid-base64", 422, "Invalid base64"


class MissingImageError(HttpProblem):
    type, status, title = "missing-image", 422, "No image in the request"


class TooManyImagesError(HttpProblem):
    type, status, title = "too-many-images", 422, "Too many images"


class AlbumTooSmallError(HttpProblem):
    type, status, title = "album-too-small", 422, "Too few usable pictures in the album"


class UnauthorizedError(HttpProblem):
    type, status, title = "unauthorized", 401, "Authentication required"


class ForbiddenError(HttpProblem):
    type, status, title = "forbidden", 403, "Forbidden"


class RateLimitedError(HttpProblem):
    type, status, title = "rate-limited", 429, "Too many requests"


class NotReadyError(HttpProblem):
    type, status, title = "not-ready", 503, "Service not ready"


class UrlFetchDisabledError(HttpProblem):
    type, status, title = "url-fetch-disabled", 404, "Fetching URLs is disabled"


class UrlRefusedError(HttpProblem):
    type, status, title = "url-refused", 400, "URL refused"


class UrlFetchError(HttpProblem):
    type, status, title = "url-fetch-failed", 422, "URL fetch failed"


def problem_dict(exc: GeolocError, instance: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = dict(getattr(exc, "extensions", None) or {})
    body.update(
        type=PROBLEM_BASE + exc.type,
        title=exc.title,
        status=exc.status,
        detail=exc.detail,
        instance=instance,
    )
    return body


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, default=str).encode()


def problem_response(exc: GeolocError, instance: str | None = None) -> ProblemResponse:
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return ProblemResponse(problem_dict(exc, instance), status_code=exc.status, headers=headers)


def openapi_problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status documented as a problem+json body."""
    text = {
        400: "Bad request (e.g. url-refused)",
        401: "No or unknown API key (unauthorized)",
        403: "The key lacks the scope (forbidden)",
        404: "Not found",
        413: "Body or image too large",
        415: "Not JSON/multipart, or not a JPEG, PNG or WebP image",
        422: "Invalid request, option, image or base64",
        429: "Rate limit exceeded (Retry-After)",
        500: "Internal error (no details are exposed)",
        503: "Not ready, overloaded (Retry-After) or database unavailable",
        504: "The image waited longer than the request deadline",
    }
    return {
        s: {
            "description": text.get(s, "Problem"),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for s in statuses
    }
