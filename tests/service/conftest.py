"""Database fixtures: every database test runs on SQLite (a temporary file) and PostgreSQL.

PostgreSQL: a fresh database per test session (``geoloc_test_<random>`` on the server named by
GEOLOC_TEST_POSTGRES_URL, default 127.0.0.1:5432 as postgres), emptied before each test and
dropped at the end. Tests on it are skipped, saying why, only when the server is unreachable.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from index.store import Manifest, PointTable, publish_index
from service.db import make_engine, make_sessionmaker, upgrade

PG_ADMIN_URL = os.environ.get(
    "GEOLOC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    admin = create_engine(
        PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    name = f"geoloc_test_{secrets.token_hex(4)}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except OperationalError as exc:
        admin.dispose()
        first = str(exc.orig or exc).strip().splitlines()[0]
        pytest.skip(f"PostgreSQL unreachable at {make_url(PG_ADMIN_URL)!r}: {first}")
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


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
