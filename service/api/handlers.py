"""The exception handlers: every error leaves as an ``application/problem+json`` body
(service/api/problems.py), whatever raised it."""

from __future__ import annotations

import logging
import uuid
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.api.problems import (
    DatabaseUnavailableError,
    HttpProblem,
    InvalidRequestError,
    problem_response,
)
from service.errors import GeolocError

log = logging.getLogger("geoloc.http")


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


def add_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GeolocError, geoloc_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(SQLAlchemyError, database_error_handler)
    app.add_exception_handler(Exception, unhandled_error_handler)
