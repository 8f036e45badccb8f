"""POST /v1/locate (and /locate), /v1/locate/batch, /v1/locate/album, /v1/locate/url,
/v1/locate/text."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api import operations as ops
from service.api.deps import AlbumDep, BatchDep, ImageDep, LocateCaller, SettingsDep, StateDep
from service.api.openapi import (
    MULTIPART_ONE,
    RouteDocs,
    multipart_many,
    request_body,
    schema_ref,
)
from service.api.problems import openapi_problems
from service.api.schemas import (
    AlbumJSONRequest,
    AlbumResponse,
    BatchResponse,
    LocateJSONRequest,
    LocateRequestOptions,
    LocateResponse,
    TextLocateRequest,
    UrlLocateRequest,
)
from service.config import Settings


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


async def locate_batch(
    request: Request, caller: LocateCaller, batch: BatchDep, state: StateDep
) -> BatchResponse:
    """Locate several images (multipart fields `files`, at most GEOLOC_MAX_BATCH).

    Each item carries a result or a problem object: a bad image fails only itself.
    """
    files, options = batch
    return await ops.locate_batch(state, files, options, caller, instance=request.url.path)


async def locate_album(
    request: Request, caller: LocateCaller, album: AlbumDep, state: StateDep
) -> AlbumResponse:
    """Locate several pictures of one place jointly: multipart fields `files`, or JSON with
    `images_base64`; 2 to GEOLOC_MAX_ALBUM pictures.

    One joint answer (candidates, region, countries, verdict; `prediction_id` for feedback on
    it), and each picture's own answer with its weight and whether it was an outlier. A
    picture that cannot be read gets its problem; the album answers from the rest when at least
    two remain. Options are query parameters (for JSON also body fields), and `spread_km`
    says how far apart the pictures may have been taken (default GEOLOC_ALBUM_SPREAD_KM).
    """
    return await ops.locate_album(
        state, album.files, album.options, album.config, caller, instance=request.url.path
    )


async def locate_url(
    caller: LocateCaller, body: UrlLocateRequest, settings: SettingsDep, state: StateDep
) -> LocateResponse:
    """Fetch an image by http(s) URL and locate it (off unless GEOLOC_URL_FETCH_ENABLED).

    Only public addresses are fetched; at most 3 redirects, each checked again.
    """
    options = ops.locate_options(settings, body.options)
    return await ops.locate_url(state, body.url, options, caller)


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


def router(settings: Settings) -> APIRouter:
    docs = RouteDocs.of(settings)
    api = APIRouter(tags=["locate"])
    one_body = request_body(
        {
            "multipart/form-data": {"schema": MULTIPART_ONE},
            "application/json": {"schema": schema_ref(LocateJSONRequest)},
        }
    )
    locate_errors = openapi_problems(400, *docs.auth_errors, 413, 415, 422, 500, 503, 504)
    for path, op_id in (("/v1/locate", "locate_v1"), ("/locate", "locate")):
        api.add_api_route(
            path,
            locate,
            methods=["POST"],
            response_model=LocateResponse,
            operation_id=op_id,
            summary="Locate one image",
            responses=locate_errors,
            openapi_extra={**one_body, **docs.secured},
        )
    api.add_api_route(
        "/v1/locate/batch",
        locate_batch,
        methods=["POST"],
        operation_id="locate_batch",
        responses=openapi_problems(400, *docs.auth_errors, 413, 415, 422, 500, 503),
        openapi_extra={
            **request_body({"multipart/form-data": {"schema": multipart_many(docs.max_batch)}}),
            **docs.secured,
        },
    )
    api.add_api_route(
        "/v1/locate/album",
        locate_album,
        methods=["POST"],
        response_model=AlbumResponse,
        operation_id="locate_album",
        summary="Locate several pictures of one place jointly",
        responses=openapi_problems(400, *docs.auth_errors, 413, 415, 422, 500, 503, 504),
        openapi_extra={
            **request_body(
                {
                    "multipart/form-data": {"schema": multipart_many(docs.max_album, 2)},
                    "application/json": {"schema": schema_ref(AlbumJSONRequest)},
                }
            ),
            **docs.secured,
        },
    )
    api.add_api_route(
        "/v1/locate/url",
        locate_url,
        methods=["POST"],
        operation_id="locate_url",
        responses=openapi_problems(400, *docs.auth_errors, 404, 413, 415, 422, 500, 503, 504),
        openapi_extra=docs.secured,
    )
    api.add_api_route(
        "/v1/locate/text",
        locate_text,
        methods=["POST"],
        operation_id="locate_text",
        responses=openapi_problems(400, *docs.auth_errors, 413, 422, 500, 503),
        openapi_extra=docs.secured,
    )
    return api
