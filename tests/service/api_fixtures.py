"""Fixtures and helpers of the HTTP API tests: the bundled bluemarble model, a small H3 index
(two published versions, for hot swap), Blue Marble tiles as upload bytes, and a factory for
the real app on a test database (the ``db_url`` fixture of conftest.py: SQLite and PostgreSQL).

Test modules import what they use from here (``from api_fixtures import ...``).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from encoders import GeoModel, load_model
from encoders.bluemarble import render_tile
from service.app import create_app
from service.db import upgrade
from service.engine import GallerySpec, build_index, load_locator
from service.pipeline import Locator
from service.settings import Settings

PROBLEM = "application/problem+json"
TYPE_BASE = "https://geoloc.dev/problems/"


@dataclass(frozen=True)
class IndexData:
    data_dir: Path
    versions: list[str]  # two published versions of "default-bluemarble", oldest first


# Test modules import these fixtures, so pytest sees one definition per module: the cache keeps
# the model, the index and the locator built once per test session all the same.
_CACHE: dict[str, Any] = {}


@pytest.fixture(scope="session")
def bm_model() -> GeoModel:
    if "model" not in _CACHE:
        _CACHE["model"] = load_model("bluemarble")
    model: GeoModel = _CACHE["model"]
    return model


@pytest.fixture(scope="session")
def bm_index(tmp_path_factory: pytest.TempPathFactory, bm_model: GeoModel) -> IndexData:
    if "index" not in _CACHE:
        data_dir = tmp_path_factory.mktemp("api-data")
        s = Settings(data_dir=data_dir)
        spec = GallerySpec(kind="h3", res=2)
        versions = [
            build_index(s, "default-bluemarble", spec, model=bm_model, progress=False).version
            for _ in range(2)
        ]
        _CACHE["index"] = IndexData(data_dir, versions)
    data: IndexData = _CACHE["index"]
    return data


@pytest.fixture(scope="session")
def bm_locator(bm_model: GeoModel, bm_index: IndexData) -> Locator:
    if "locator" not in _CACHE:
        s = Settings(data_dir=bm_index.data_dir)
        _CACHE["locator"] = load_locator(s, model=bm_model, index_version=bm_index.versions[0])
    locator: Locator = _CACHE["locator"]
    return locator


def tile_bytes(lat: float = 23.0, lon: float = 12.0, fmt: str = "PNG", size: int = 64) -> bytes:
    buf = io.BytesIO()
    render_tile(lat, lon, 2.0, size).save(buf, fmt)
    return buf.getvalue()


def api_settings(db_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"database_url": db_url, "index_poll_s": 0}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_client(
    db_url: str, bm_index: IndexData, bm_locator: Locator
) -> Iterator[Callable[..., Any]]:
    """make_client(**settings) -> a context manager giving a started TestClient on a database
    migrated to head (pass migrate=False for an empty one, locator=... to inject another)."""

    @contextmanager
    def factory(
        *, migrate: bool = True, locator: Locator | None = None, **overrides: Any
    ) -> Iterator[TestClient]:
        if migrate:
            upgrade(db_url)
        overrides.setdefault("data_dir", bm_index.data_dir)
        settings = api_settings(db_url, **overrides)
        app = create_app(settings, locator=locator or bm_locator)
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client

    yield factory


def assert_problem(response: Any, status: int, type_: str) -> dict[str, Any]:
    """The response is a problem+json of this status and type; returns its body."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith(PROBLEM), response.headers
    body: dict[str, Any] = response.json()
    assert body["type"] == TYPE_BASE + type_, body
    assert body["status"] == status and body["title"] and body["detail"], body
    assert "Traceback" not in response.text
    return body
