"""Fixtures of the HTTP API tests: the bundled bluemarble model, a small H3 index (two
published versions, for hot swap), a copy of it with a calibration and fitted localizability
verdict (``judged``), and a factory for the real app on a test database (the
``db_url`` fixture of conftest.py: SQLite and PostgreSQL).

Test modules load this file as a plugin (``pytest_plugins = ["api_fixtures"]``) so the session
fixtures exist once; helpers are in api_helpers.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from api_helpers import IndexData, api_settings
from fastapi.testclient import TestClient

from encoders import GeoModel, load_model
from service.api.main import create_app
from service.config import Settings
from service.db import upgrade
from service.engine.loading import load_locator
from service.engine.locator import Locator
from service.jobs.datasets import read_labelled_csv
from service.jobs.evaluate import fit_calibration
from service.jobs.indexes import GallerySpec, build_index
from service.jobs.training import write_bluemarble_set

#: The fitted verdict of the tests: held-out tiles and generated negatives per kind.
FIT_TILES = 300
NEGATIVES_PER_KIND = 40


@pytest.fixture(scope="session")
def bm_model() -> GeoModel:
    return load_model("bluemarble")


@pytest.fixture(scope="session")
def bm_index(tmp_path_factory: pytest.TempPathFactory, bm_model: GeoModel) -> IndexData:
    data_dir = tmp_path_factory.mktemp("api-data")
    s = Settings(data_dir=data_dir)
    spec = GallerySpec(kind="h3", res=2)
    versions = [
        build_index(s, "default-bluemarble", spec, model=bm_model, progress=False).version
        for _ in range(2)
    ]
    return IndexData(data_dir, versions)


@pytest.fixture(scope="session")
def bm_locator(bm_model: GeoModel, bm_index: IndexData) -> Locator:
    s = Settings(data_dir=bm_index.data_dir)
    return load_locator(s, model=bm_model, index_version=bm_index.versions[0])


@pytest.fixture(scope="session")
def judged(tmp_path_factory, bm_model: GeoModel, bm_index: IndexData) -> SimpleNamespace:
    """A data dir of its own (the session's two index versions), a calibration with a fitted
    verdict for the first version, and the Locator that serves it."""
    root = tmp_path_factory.mktemp("localizability")
    data_dir = root / "data"
    shutil.copytree(bm_index.data_dir / "indexes", data_dir / "indexes")
    v1, v2 = bm_index.versions
    # Held-out tiles in the training style (zoom and colour changes), as `geoloc setup` fits.
    fit = write_bluemarble_set(root / "fit", FIT_TILES, seed=515, kind="train", progress=False)
    s = Settings(data_dir=data_dir)
    raw = load_locator(
        s.model_copy(update={"calibration": "off"}), model=bm_model, index_version=v1
    )
    rows, problems = read_labelled_csv(fit)
    assert not problems
    r = fit_calibration(s, raw, rows, data=fit, negatives_per_kind=NEGATIVES_PER_KIND)
    assert r.path is not None
    return SimpleNamespace(
        root=root,
        data_dir=data_dir,
        versions=(v1, v2),
        calibration=r.calibration,
        path=r.path,
        locator=load_locator(s, model=bm_model, index_version=v1),
    )


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
