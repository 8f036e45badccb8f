"""Helpers of the HTTP API tests (the fixtures are in api_fixtures.py)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoders.bluemarble import render_tile
from service.config import Settings

PROBLEM = "application/problem+json"
TYPE_BASE = "https://geoloc.dev/problems/"


@dataclass(frozen=True)
class IndexData:
    data_dir: Path
    versions: list[str]  # two published versions of "default-bluemarble", oldest first


def tile_bytes(lat: float = 23.0, lon: float = 12.0, fmt: str = "PNG", size: int = 64) -> bytes:
    """A Blue Marble view of (lat, lon), encoded as an upload."""
    buf = io.BytesIO()
    render_tile(lat, lon, 2.0, size).save(buf, fmt)
    return buf.getvalue()


def api_settings(db_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"database_url": db_url, "index_poll_s": 0}
    values.update(overrides)
    return Settings(**values)


def assert_problem(response: Any, status: int, type_: str) -> dict[str, Any]:
    """The response is a problem+json of this status and type; returns its body."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    ctype = response.headers["content-type"]
    assert ctype.startswith(PROBLEM), (ctype, response.text[:200])
    body: dict[str, Any] = response.json()
    assert body["type"] == TYPE_BASE + type_, body
    assert body["status"] == status and body["title"] and body["detail"], body
    assert "Traceback" not in response.text, body
    return body
