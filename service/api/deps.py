"""The dependencies the routes share: the ServiceState on ``app.state.service`` and what it
holds (settings, Locator, a database session), the API-key check and rate limit, and the
readers of the locate bodies (one image, a batch, an album)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from service.api import operations as ops
from service.api.problems import (
    ForbiddenError,
    InvalidRequestError,
    MissingImageError,
    TooManyImagesError,
    UnauthorizedError,
    UnsupportedContentTypeError,
)
from service.api.runtime import ServiceState
from service.api.schemas import AlbumJSONRequest, LocateJSONRequest, LocateRequestOptions
from service.config import Settings
from service.db import authenticate
from service.engine.locator import LocateOptions, Locator
from service.engine.options import MAX_SPREAD_KM, SPREAD_DOC, AlbumConfig

# -- the state and what it holds ------------------------------------------------------------------


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

# -- who is calling -------------------------------------------------------------------------------


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

_Body = TypeVar("_Body", LocateJSONRequest, AlbumJSONRequest)

# -- the locate bodies ----------------------------------------------------------------------------


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


@contextlib.asynccontextmanager
async def _form(request: Request, max_files: int, too_many: str) -> AsyncIterator[FormData]:
    """The multipart form, parsed with a file limit; past it the parser's own 400 becomes our
    ``too-many-images`` (``too_many`` says the bound), so the count never changes the type."""
    try:
        async with request.form(max_files=max_files, max_fields=64) as form:
            yield form
    except HTTPException as exc:
        if exc.status_code == 400 and str(exc.detail).startswith("Too many files"):
            raise TooManyImagesError(too_many) from None
        raise


def _is_json(ctype: str) -> bool:
    return ctype == "application/json" or ctype.endswith("+json")


async def _json_body(
    request: Request, model: type[_Body], settings: Settings, query: QueryOptions
) -> tuple[_Body, LocateOptions]:
    """A JSON locate body and its options: the query string's, overridden by the body's option
    fields (not its pictures, nor an album's spread)."""
    try:
        body = model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise _invalid_request(exc, "body") from None
    merged = {**query.model_dump(exclude_none=True), **body.model_dump(exclude_none=True)}
    options = {k: v for k, v in merged.items() if k in LocateRequestOptions.model_fields}
    return body, ops.locate_options(settings, LocateRequestOptions(**options))


async def _multipart_files(
    request: Request, settings: Settings, limit: int, too_many: str
) -> list[tuple[str | None, bytes]]:
    """The (filename, bytes) of the multipart fields ``files``, at most ``limit`` of them."""
    async with _form(request, limit, too_many) as form:
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not files:
            raise MissingImageError("send the images as multipart fields named 'files'")
        _only_fields(form, "files")
        return [(f.filename, await _read_upload(f, settings.max_image_bytes)) for f in files]


async def read_image_input(
    request: Request, settings: SettingsDep, query: QueryOptions
) -> ImageInput:
    """The one image of /v1/locate: multipart ``file`` or JSON ``image_base64``.

    Options come from the query string; in a JSON body they may also be body fields (which win).
    """
    ctype = _content_type(request)
    if _is_json(ctype):
        body, opts = await _json_body(request, LocateJSONRequest, settings, query)
        data = ops.decode_base64(body.image_base64, settings.max_image_bytes)
        return ImageInput(data=data, filename=None, options=opts)
    if ctype == "multipart/form-data":
        opts = ops.locate_options(settings, query)
        one = "one 'file' per request; send several to POST /v1/locate/batch as 'files'"
        async with _form(request, 1, one) as form:
            files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
            if not files:
                raise MissingImageError("send the image as the multipart field 'file'")
            _only_fields(form, "file")
            data = await _read_upload(files[0], settings.max_image_bytes)
            return ImageInput(data=data, filename=files[0].filename, options=opts)
    raise UnsupportedContentTypeError(
        f"send multipart/form-data (field 'file') or application/json (image_base64), "
        f"not {ctype or 'no content type'!r}"
    )


ImageDep = Annotated[ImageInput, Depends(read_image_input)]


async def read_batch_input(
    request: Request, settings: SettingsDep, query: QueryOptions
) -> tuple[list[tuple[str | None, bytes]], LocateOptions]:
    if _content_type(request) != "multipart/form-data":
        raise UnsupportedContentTypeError(
            "send the images as multipart/form-data, each in a field named 'files'"
        )
    opts = ops.locate_options(settings, query)
    too_many = f"at most {settings.max_batch} images per batch (GEOLOC_MAX_BATCH)"
    return await _multipart_files(request, settings, settings.max_batch, too_many), opts


@dataclass(frozen=True)
class AlbumInput:
    files: list[tuple[str | None, bytes | str]]
    options: LocateOptions
    config: AlbumConfig


SpreadQuery = Annotated[
    float | None,
    Query(ge=0, le=MAX_SPREAD_KM, description=SPREAD_DOC + " Default GEOLOC_ALBUM_SPREAD_KM."),
]


async def read_album_input(
    request: Request, settings: SettingsDep, query: QueryOptions, spread_km: SpreadQuery = None
) -> AlbumInput:
    """The pictures of /v1/locate/album: multipart ``files`` (bytes) or JSON ``images_base64``
    (base64 text, decoded per picture), at most GEOLOC_MAX_ALBUM, with the album's spread (the
    query's, overridden by a JSON body's). How many can be used is the operation's check: a bad
    picture is a problem of its own."""
    limit = settings.max_album
    too_many = f"at most {limit} pictures per album (GEOLOC_MAX_ALBUM)"
    ctype = _content_type(request)
    if _is_json(ctype):
        body, opts = await _json_body(request, AlbumJSONRequest, settings, query)
        if len(body.images_base64) > limit:
            raise TooManyImagesError(too_many)
        spread = spread_km if body.spread_km is None else body.spread_km
        files: list[tuple[str | None, bytes | str]] = [(None, t) for t in body.images_base64]
        return AlbumInput(files, opts, settings.album_config(spread))
    if ctype == "multipart/form-data":
        opts = ops.locate_options(settings, query)
        parts = list(await _multipart_files(request, settings, limit, too_many))
        return AlbumInput(parts, opts, settings.album_config(spread_km))
    raise UnsupportedContentTypeError(
        f"send multipart/form-data (fields 'files') or application/json (images_base64), "
        f"not {ctype or 'no content type'!r}"
    )


AlbumDep = Annotated[AlbumInput, Depends(read_album_input)]
BatchDep = Annotated[
    tuple[list[tuple[str | None, bytes]], LocateOptions], Depends(read_batch_input)
]
