"""Hostile and broken input: every case is a 4xx problem+json with a stable type, never a 500.

The table tests run on one app (SQLite: the database plays no part in parsing input); the
schemathesis run fuzzes every operation of the app's own OpenAPI schema.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
import uvicorn
from api_helpers import IndexData, api_settings, assert_problem, tile_bytes
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis.config import SchemathesisConfig

from service.api.main import create_app
from service.config import Settings
from service.db import upgrade
from tests.hostile import animated, encoded, scan_bomb
from tests.net import free_port

pytest_plugins = ["api_fixtures"]  # the bluemarble model, index and app fixtures

MIB = 1024 * 1024
LIMITS = {
    "max_request_bytes": 2 * MIB,
    "max_image_bytes": MIB,
    "max_image_pixels": 4_000_000,
    "max_batch": 4,
}


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('bad-input') / 'geoloc.db'}"
    upgrade(url)
    return url


@pytest.fixture(scope="module")
def client(sqlite_url: str, bm_index: IndexData, bm_locator) -> Iterator[TestClient]:
    s = api_settings(sqlite_url, data_dir=bm_index.data_dir, **LIMITS)
    with TestClient(create_app(s, locator=bm_locator), raise_server_exceptions=False) as c:
        yield c


# -- images ---------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring width x height, with a tiny compressed body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 65536, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def filled_png_bomb(side: int) -> bytes:
    """A complete side x side RGB PNG of zeros: tiny on the wire, side² x 3 bytes decoded."""
    row = b"\0" * (1 + 3 * side)  # filter byte + pixels
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    pack = zlib.compressobj(9)
    idat = b"".join(pack.compress(row) for _ in range(side)) + pack.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


SMALL = Image.new("RGB", (32, 32), (10, 120, 40))
JPEG = tile_bytes(fmt="JPEG")
SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"

BAD_FILES = {
    "zero bytes": (b"", 422, "empty-image"),
    "random bytes": (np.random.default_rng(0).bytes(4096), 415, "unsupported-media-type"),
    "truncated JPEG": (JPEG[: len(JPEG) // 2], 422, "corrupt-image"),
    "JPEG magic only": (b"\xff\xd8\xff\xe0" + b"\0" * 64, 422, "corrupt-image"),
    "PNG bomb 100000x100000": (png_bomb(), 413, "too-many-pixels"),
    "huge dimensions": (
        encoded(Image.new("RGB", (2500, 2000)), "JPEG", quality=20),
        413,
        "too-many-pixels",
    ),
    "GIF": (encoded(SMALL, "GIF"), 415, "unsupported-media-type"),
    "SVG": (SVG, 415, "unsupported-media-type"),
    "PDF renamed .jpg": (PDF, 415, "unsupported-media-type"),
    "BMP": (encoded(SMALL, "BMP"), 415, "unsupported-media-type"),
    "image over the byte limit": (b"\xff\xd8\xff" + b"\0" * (MIB + 10), 413, "image-too-large"),
    "a 4000 x 1 strip": (
        encoded(Image.new("RGB", (4000, 1)), "PNG"),
        422,
        "unsupported-image-shape",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files(client, case):
    data, status, type_ = BAD_FILES[case]
    r = client.post("/v1/locate", files={"file": ("photo.jpg", data, "image/jpeg")})
    assert_problem(r, status, type_)
    # The same bytes as base64 JSON, and inside a batch, give the same problem.
    if 0 < len(data) < MIB:  # (an empty image_base64 fails validation: invalid-request)
        r = client.post("/locate", json={"image_base64": base64.b64encode(data).decode()})
        assert_problem(r, status, type_)
    r = client.post("/v1/locate/batch", files=[("files", ("x.jpg", data, "image/jpeg"))])
    assert r.status_code == 200
    assert r.json()["items"][0]["problem"]["type"].endswith("/" + type_)


def _peak_rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM:")).split()[1]) * 1024


def test_memory_stays_bounded_under_hostile_input(client):
    # 15000 x 15000 decodes to 675 MB; compressed it fits under the 1 MiB image limit, so only
    # the pixel check stands between it and the decoder.
    bomb = filled_png_bomb(15_000)
    assert len(bomb) < MIB
    hostile = [bomb, png_bomb(), BAD_FILES["huge dimensions"][0], JPEG[: len(JPEG) // 2]]
    Path("/proc/self/clear_refs").write_text("5")  # resets this process's peak RSS (VmHWM)
    before = _peak_rss_bytes()
    for _ in range(3):
        for data in hostile:
            r = client.post("/v1/locate", files={"file": ("x.png", data, "image/png")})
            assert 400 <= r.status_code < 500, r.text
            b64 = base64.b64encode(data).decode()
            r = client.post("/v1/locate", json={"image_base64": b64})
            assert 400 <= r.status_code < 500, r.text
            r = client.post("/v1/locate/batch", files=[("files", ("x.png", data, "image/png"))])
            assert r.status_code == 200 and "problem" in r.json()["items"][0]
    growth = _peak_rss_bytes() - before
    assert growth < 100 * MIB, f"peak memory grew by {growth / MIB:.0f} MiB"


def shape_corpus() -> list[tuple[str, bytes, str | None]]:
    """(name, bytes, the problem type expected, or None for 200): 1 x N and N x 1 strips in
    PNG, WebP and JPEG, N up to what each format and the pixel limit allow, and a 2 x N band;
    a JPEG of 2,000 scans at the pixel limit (about 10 s to decode); animated PNG and WebP of
    many frames (only the first is decoded)."""
    n_png = LIMITS["max_image_pixels"]  # the largest strip under the pixel limit
    sizes = {"PNG": n_png, "WEBP": 16_383, "JPEG": 65_500}  # the formats' own maxima
    out: list[tuple[str, bytes, str | None]] = []
    for fmt, n in sizes.items():
        for w, h in ((n, 1), (1, n), (min(n, LIMITS["max_image_pixels"] // 2), 2)):
            strip = encoded(Image.new("RGB", (w, h), (90, 120, 60)), fmt)
            out.append((f"{fmt} {w}x{h}", strip, "unsupported-image-shape"))
    out.append(("JPEG of 2,000 scans", scan_bomb(2000, 2000), "too-many-scans"))
    out.append(("APNG of 300 frames", animated("PNG", 300, 128), None))
    out.append(("animated WebP of 300 frames", animated("WEBP", 300, 128), None))
    return out


def test_extreme_shapes_are_refused_at_once_with_bounded_memory(client):
    """Every decode path: each picture answers within 2 s, 4xx with its type or 200, and the
    whole corpus leaves the peak RSS within 200 MiB."""
    corpus = shape_corpus()
    Path("/proc/self/clear_refs").write_text("5")  # resets this process's peak RSS (VmHWM)
    before = _peak_rss_bytes()
    for name, data, kind in corpus:
        assert len(data) <= LIMITS["max_image_bytes"], name
        status = 200 if kind is None else 413 if kind == "too-many-pixels" else 422
        t0 = time.perf_counter()
        r = client.post("/v1/locate", files={"file": ("x", data, "image/png")})
        assert r.status_code == status, f"{name}: {r.text}"
        assert kind is None or r.json()["type"].endswith(f"/{kind}"), f"{name}: {r.text}"
        r = client.post("/v1/locate", json={"image_base64": base64.b64encode(data).decode()})
        assert r.status_code == status, f"{name}: {r.text}"
        r = client.post("/v1/locate/batch", files=[("files", ("x", data, "image/png"))])
        item = r.json()["items"][0]
        assert (
            (item.get("problem") or {}).get("type", "").endswith(f"/{kind}")
            if kind
            else (item.get("problem") is None)
        ), f"{name}: {item}"
        assert time.perf_counter() - t0 < 3 * 2.0, f"{name}: over 2 s a request"
    growth = _peak_rss_bytes() - before
    assert growth < 200 * MIB, f"peak memory grew by {growth / MIB:.0f} MiB"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_whatever_the_declared_type(client, fmt):
    data = encoded(Image.new("RGB", (48, 40), (30, 90, 200)), fmt)
    r = client.post("/v1/locate", files={"file": ("x.gif", data, "application/octet-stream")})
    assert r.status_code == 200, r.text


def test_exif_orientation_is_applied(client):
    img = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°
    r = client.post(
        "/v1/locate", files={"file": ("x.jpg", encoded(img, "JPEG", exif=exif), "image/jpeg")}
    )
    assert r.status_code == 200, r.text


# -- requests -------------------------------------------------------------------------------------

PNG = tile_bytes()
B64 = base64.b64encode(PNG).decode()


def file(data: bytes = PNG) -> dict[str, Any]:
    return {"files": {"file": ("t.png", data, "image/png")}}


BAD_REQUESTS: dict[str, tuple[dict[str, Any], int, str]] = {
    "text/plain body": (
        {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported-content-type",
    ),
    "raw image body": (
        {"content": PNG, "headers": {"Content-Type": "image/png"}},
        415,
        "unsupported-content-type",
    ),
    "no content type": ({"content": PNG}, 415, "unsupported-content-type"),
    "form-urlencoded": ({"data": {"file": "x"}}, 415, "unsupported-content-type"),
    "multipart without file": (
        {"files": {"other": ("t.png", PNG, "image/png")}},
        422,
        "missing-image",
    ),
    "multipart file as text field": (
        {"data": {"file": "abc"}, "files": {"x": ("a", b"1")}},
        422,
        "missing-image",
    ),
    "two files": (
        {"files": [("file", ("a.png", PNG, "image/png")), ("file", ("b.png", PNG, "image/png"))]},
        422,
        "too-many-images",
    ),
    "broken multipart": (
        {
            "content": b"--xyz\r\nContent-Disposition: form-data; name=file\r\n\r\nabc",
            "headers": {"Content-Type": "multipart/form-data; boundary=xyz"},
        },
        422,
        "missing-image",
    ),
    "multipart without boundary": (
        {"content": b"abc", "headers": {"Content-Type": "multipart/form-data"}},
        400,
        "invalid-request",
    ),
    "malformed base64": ({"json": {"image_base64": "!!!not base64!!!"}}, 422, "invalid-base64"),
    "base64 with bad padding": ({"json": {"image_base64": "abcde"}}, 422, "invalid-base64"),
    "non-ASCII base64": ({"json": {"image_base64": "ÿØÿà"}}, 422, "invalid-base64"),
    "base64 too long": ({"json": {"image_base64": "A" * (2 * MIB - 100)}}, 413, "image-too-large"),
    "empty base64": ({"json": {"image_base64": ""}}, 422, "empty-image"),
    "invalid JSON": (
        {"content": b"{nope", "headers": {"Content-Type": "application/json"}},
        422,
        "invalid-request",
    ),
    "JSON array": ({"json": [1, 2]}, 422, "invalid-request"),
    "JSON without image": ({"json": {"top_k": 3}}, 422, "invalid-request"),
    "unknown JSON field": ({"json": {"image_base64": B64, "foo": 1}}, 422, "invalid-request"),
    "top_k 0": ({**file(), "params": {"top_k": 0}}, 422, "invalid-request"),
    "top_k negative": ({**file(), "params": {"top_k": -3}}, 422, "invalid-request"),
    "top_k huge": ({**file(), "params": {"top_k": 10**9}}, 422, "invalid-option"),
    "top_k text": ({**file(), "params": {"top_k": "five"}}, 422, "invalid-request"),
    "rerank_k negative": ({**file(), "params": {"rerank_k": -1}}, 422, "invalid-request"),
    "rerank_k huge": ({**file(), "params": {"rerank_k": 10**6}}, 422, "invalid-option"),
    "top_k huge in JSON": ({"json": {"image_base64": B64, "top_k": 10**30}}, 422, "invalid-option"),
    "top_k float in JSON": ({"json": {"image_base64": B64, "top_k": 2.5}}, 422, "invalid-request"),
    "region_share NaN": ({**file(), "params": {"region_share": "nan"}}, 422, "invalid-request"),
    "region_share 0": ({**file(), "params": {"region_share": 0}}, 422, "invalid-request"),
    "neighbours too many": ({**file(), "params": {"neighbours": 999}}, 422, "invalid-request"),
    "bbox 3 values": ({**file(), "params": {"bbox": "1,2,3"}}, 422, "invalid-request"),
    "bbox south > north": ({**file(), "params": {"bbox": "50,0,10,10"}}, 422, "invalid-option"),
    "bbox out of range": ({**file(), "params": {"bbox": "0,0,95,10"}}, 422, "invalid-option"),
    "country not ISO2": ({**file(), "params": {"countries": "FRA"}}, 422, "invalid-request"),
    "refine not a bool": ({**file(), "params": {"refine": "maybe"}}, 422, "invalid-request"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_locate_requests(client, case):
    kwargs, status, type_ = BAD_REQUESTS[case]
    assert_problem(client.post("/v1/locate", **kwargs), status, type_)


def test_oversized_body_with_content_length_is_refused_before_reading(client):
    body = b"\0" * (3 * MIB)
    r = client.post("/v1/locate", files={"file": ("big.png", body, "image/png")})
    body = assert_problem(r, 413, "request-too-large")
    assert "GEOLOC_MAX_REQUEST_BYTES" in body["detail"]


MULTIPART_HEAD = (
    b"--xyz\r\n"
    b'Content-Disposition: form-data; name="file"; filename="big.png"\r\n'
    b"Content-Type: image/png\r\n\r\n"
)


def test_oversized_chunked_body_without_content_length(client):
    def stream() -> Iterator[bytes]:
        yield MULTIPART_HEAD
        for _ in range(48):  # 3 MiB in 64 KiB chunks
            yield b"\0" * 65536

    r = client.post(
        "/v1/locate",
        content=stream(),
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_problem(r, 413, "request-too-large")
    r = client.post("/v1/locate", content=stream(), headers={"Content-Type": "application/json"})
    assert_problem(r, 413, "request-too-large")


@pytest.mark.parametrize(
    "body",
    [
        '{"lat": NaN, "lon": 0}',
        '{"lat": 0, "lon": Infinity}',
        '{"lat": 91, "lon": 0}',
        '{"lat": 0, "lon": -180.5}',
        '{"lat": "north", "lon": 0}',
        '{"lat": 1}',
        '{"lat": 1, "lon": 2, "extra": 3}',
        "[]",
        "nope",
    ],
)
def test_bad_feedback(client, body):
    pid = client.post("/v1/locate", **file()).json()["prediction_id"]
    r = client.post(
        f"/v1/predictions/{pid}/feedback",
        content=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert_problem(r, 422, "invalid-request")


@pytest.mark.parametrize("n", [2, 17, 40])
def test_too_many_files_is_one_problem_whatever_the_count(client, n):
    """The multipart parser's own file limit must not speak instead of ours: 2, 17 or 40
    `file` parts to /v1/locate, and max_batch + 1 or far more `files` to the batch, are all
    `too-many-images`, with its own title."""
    tiny = ("t.png", b"\x89PNG", "image/png")
    r = client.post("/v1/locate", files=[("file", tiny)] * n)
    assert_problem(r, 422, "too-many-images")
    assert r.json()["title"] == "Too many images"
    for m in (LIMITS["max_batch"] + 1, LIMITS["max_batch"] + 17 + n):
        r = client.post("/v1/locate/batch", files=[("files", tiny)] * m)
        assert_problem(r, 422, "too-many-images")
        assert str(LIMITS["max_batch"]) in r.json()["detail"]


def test_other_bad_requests(client):
    r = client.get("/v1/locate")
    assert_problem(r, 405, "method-not-allowed")
    assert "POST" in r.headers["allow"]
    assert_problem(client.get("/v2/nothing"), 404, "not-found")
    assert_problem(client.get("/v1/predictions/" + "f" * 100), 422, "invalid-request")
    assert_problem(client.get("/v1/predictions/not-an-id"), 404, "not-found")
    assert_problem(client.get("/v1/stats", params={"since": "2020-13-45"}), 422, "invalid-option")
    assert_problem(
        client.post("/v1/locate/url", json={"url": "http://example.com/a.jpg", "x": 1}),
        422,
        "invalid-request",
    )
    # Unknown keys are refused at every level of a body, nested options included.
    nested = {"url": "http://example.com/a.jpg", "options": {"topk": 3}}
    r = client.post("/v1/locate/url", json=nested)
    assert_problem(r, 422, "invalid-request")
    assert "topk" in r.json()["detail"]
    assert_problem(
        client.post("/v1/admin/index/activate", content=b"{", headers={"content-type": "x"}),
        403,
        "forbidden",
    )
    # Feedback bodies are bounded by the same middleware.
    big = json.dumps({"lat": 1, "lon": 2, "pad": "x" * (3 * MIB)})
    r = client.post(f"/v1/predictions/{'a' * 32}/feedback", content=big.encode())
    assert_problem(r, 413, "request-too-large")


# -- a real server: chunked uploads on the wire ----------------------------------------------------


@pytest.fixture(scope="module")
def live_url(sqlite_url: str, bm_index: IndexData, bm_locator) -> Iterator[str]:
    s = api_settings(sqlite_url, data_dir=bm_index.data_dir, **LIMITS)
    port = free_port()
    config = uvicorn.Config(
        create_app(s, locator=bm_locator), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_chunked_upload_over_http_is_cut_off(live_url):
    sent = 0

    def stream() -> Iterator[bytes]:
        nonlocal sent
        yield MULTIPART_HEAD
        for _ in range(160):  # 10 MiB: far more than the 2 MiB limit
            sent += 65536
            yield b"\0" * 65536

    with httpx.Client(base_url=live_url, timeout=30) as http:
        try:
            r = http.post(
                "/v1/locate",
                content=stream(),
                headers={"Content-Type": "multipart/form-data; boundary=xyz"},
            )
        except httpx.HTTPError:  # the server may close while we still send: also a refusal
            assert sent < 10 * MIB
            return
        assert_problem(r, 413, "request-too-large")
        ok = http.post("/v1/locate", files={"file": ("t.png", PNG, "image/png")})
        assert ok.status_code == 200
        r = http.post(
            "/v1/locate",
            content=b"x" * (3 * MIB),
            headers={"Content-Type": "application/json"},
        )
        assert_problem(r, 413, "request-too-large")


# -- schemathesis: the app against its own schema --------------------------------------------------


# The schema is static (it depends on settings, not on the model): load it at import, and send
# the generated requests to an app with the model and a database. (schemathesis' lazy
# ``from_fixture`` loader does not work with pytest 9.)
#
# Every built-in check (schemathesis 4 enables all 14 by default: server errors, status codes,
# content types, headers and bodies against the schema, negative data refused, positive data
# accepted, missing headers, unsupported methods, Allow headers, auth and resource checks),
# with positive and negative data. One allowance, which a schema cannot express: for the locate
# operations a schema-valid request may still be refused with 413/415/422, because what makes
# an upload an image (and options such as a bbox with south <= north) is not JSON Schema.
FUZZ_CONFIG = SchemathesisConfig.from_dict(
    {
        "operations": [
            {
                "include-path-regex": "^/(v1/)?locate",
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": ["2xx", "401", "403", "404", "413", "415", "422"]
                    }
                },
            }
        ]
    }
)
schema = schemathesis.openapi.from_dict(
    create_app(Settings(**LIMITS)).openapi(), config=FUZZ_CONFIG
)


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory, bm_index: IndexData, bm_locator) -> Any:
    url = f"sqlite:///{Path(tmp_path_factory.mktemp('fuzz')) / 'geoloc.db'}"
    upgrade(url)
    s = api_settings(url, data_dir=bm_index.data_dir, **LIMITS)
    return create_app(s, locator=bm_locator)


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_schemathesis(case, fuzz_app):
    case.call_and_validate(app=fuzz_app)
