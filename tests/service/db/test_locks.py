"""The index build lock and the migration lock, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from encoders import GeoModel
from index.store import list_indexes
from service.config import Settings
from service.db import (
    IndexBuildLockedError,
    current_revision,
    head_revision,
    index_build_lock,
    make_engine,
    upgrade,
)
from service.db.schema import _MIGRATION_LOCK_KEY
from service.db.session import _WRITE_OPTION
from service.jobs.indexes import GallerySpec, build_index

pytest_plugins = ["api_fixtures"]


def test_one_build_per_name(db_url: str) -> None:
    with index_build_lock(db_url, "a"):
        busy = pytest.raises(IndexBuildLockedError, match="another build of index 'a'")
        with busy, index_build_lock(db_url, "a"):
            pass
        with index_build_lock(db_url, "b"):  # other names are free
            pass
    with index_build_lock(db_url, "a"):  # released
        pass


def test_build_index_refuses_while_locked_and_clears_leftovers(
    db_url: str, tmp_path: Path, bm_model: GeoModel
) -> None:
    s = Settings(data_dir=tmp_path, database_url=db_url)
    spec = GallerySpec(kind="h3", res=0)
    leftover = tmp_path / "indexes" / "g" / ".tmp-20000101-000000-000000-deadbeef"
    leftover.mkdir(parents=True)
    with index_build_lock(db_url, "g"), pytest.raises(IndexBuildLockedError):
        build_index(s, "g", spec, model=bm_model, progress=False)
    assert list_indexes(tmp_path, "g") == [] and leftover.exists()
    build_index(s, "g", spec, model=bm_model, progress=False)
    assert len(list_indexes(tmp_path, "g")) == 1 and not leftover.exists()


def test_migrations_wait_for_the_migration_lock(db_url: str) -> None:
    """A second migrator waits for the first's transaction, then finds the schema at head."""
    engine = make_engine(db_url)
    done: list[str | None] = []
    try:
        with engine.connect() as conn:
            conn.execution_options(**{_WRITE_OPTION: True})
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
            else:
                conn.exec_driver_sql("SELECT 1")  # in BEGIN IMMEDIATE: the SQLite write lock
            worker = threading.Thread(target=lambda: done.append(upgrade(db_url)))
            worker.start()
            time.sleep(1.0)
            assert worker.is_alive() and not done  # blocked behind the held lock
            conn.rollback()
        worker.join(timeout=30)
        assert done == [head_revision()] and current_revision(engine) == head_revision()
    finally:
        engine.dispose()
