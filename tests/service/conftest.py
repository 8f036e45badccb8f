"""Database fixtures: every database test runs on SQLite (a temporary file) and PostgreSQL.

PostgreSQL: the session database of ``postgres_database`` (tests/conftest.py), emptied before
each test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from index.store import Manifest, PointTable, publish_index
from service.db import make_engine, make_sessionmaker, upgrade


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database (no tables, no alembic_version)."""
    if request.param == "sqlite":
        # A directory that does not exist yet: make_engine must create it.
        return f"sqlite:///{tmp_path / 'dbdir' / 'geoloc.db'}"
    url: str = request.getfixturevalue("postgres_database")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
    finally:
        engine.dispose()
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on a database migrated to head."""
    upgrade(db_url)
    eng = make_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with make_sessionmaker(engine)() as s:
        yield s


def _publish_tiny_index(root: Path, name: str, version: str, n: int = 5) -> Manifest:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(n, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    latlon = np.stack([np.linspace(-40, 40, n), np.linspace(-100, 100, n)], axis=1)
    points = PointTable(
        ids=np.arange(n, dtype=np.int64), latlon=latlon, country=np.array([""] * n, dtype="<U2")
    )
    return publish_index(
        root,
        name,
        vecs,
        points,
        profile="bluemarble",
        gallery_kind="csv",
        h3_resolution=None,
        version=version,
    )


@pytest.fixture
def publish_tiny_index() -> Callable[..., Manifest]:
    """publish_tiny_index(root, name, version): a real, small index published under root."""
    return _publish_tiny_index
