"""Alembic migrations on SQLite and PostgreSQL: up, down, up again; models match the DDL."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import insert, inspect, select
from sqlalchemy.exc import IntegrityError

from service.db import (
    SchemaNotAtHeadError,
    check_at_head,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    upgrade,
)
from service.db.models import ApiKey, Base, IndexVersion
from service.db.schema import MIGRATIONS_DIR

REPO = Path(__file__).resolve().parents[3]
TABLES = {"index_versions", "reference_images", "predictions", "feedback", "api_keys"}


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_empty_to_head(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) is None
        assert tables(db_url) == set()
        assert upgrade(db_url) == head_revision()
        assert current_revision(engine) == head_revision()
        assert tables(db_url) == TABLES
        assert upgrade(db_url) == head_revision()  # running it again changes nothing
    finally:
        engine.dispose()


def test_downgrade_to_base_and_up_again(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(ApiKey).values(name="x", prefix="glk_abcd", key_hash="0" * 64, scopes="a")
            )
        assert downgrade(db_url, "base") is None
        assert current_revision(engine) is None
        assert tables(db_url) == set()
        assert upgrade(db_url) == head_revision()
        assert tables(db_url) == TABLES
        with engine.connect() as conn:
            assert conn.execute(select(ApiKey.id)).all() == []  # the old rows went with base
    finally:
        engine.dispose()


def revisions_oldest_first() -> list[str]:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return [s.revision for s in reversed(list(ScriptDirectory.from_config(cfg).walk_revisions()))]


def test_history_has_one_head() -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    heads = ScriptDirectory.from_config(cfg).get_heads()
    assert heads == [head_revision()], f"several heads {heads}: merge them (alembic merge)"


def test_every_revision_goes_up_and_down_one_step_at_a_time(db_url: str) -> None:
    engine = make_engine(db_url)
    revs = revisions_oldest_first()
    try:
        for rev in revs:
            assert upgrade(db_url, rev) == rev
            assert current_revision(engine) == rev
        for below in [*reversed(revs[:-1]), None]:
            assert downgrade(db_url, "-1") == below
            assert current_revision(engine) == below
        assert tables(db_url) == set()  # base leaves nothing behind
    finally:
        engine.dispose()


def test_models_match_migrations(db_url: str) -> None:
    """Autogenerate against the migrated database finds nothing to do."""
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_one_active_version_per_name_is_enforced_by_the_schema(db_url: str) -> None:
    """The partial unique index exists after migration on both dialects."""
    upgrade(db_url)
    engine = make_engine(db_url)
    row = {
        "name": "a",
        "profile": "p",
        "gallery_kind": "h3",
        "count": 1,
        "path": "/x",
        "manifest": {},
        "active": True,
    }
    try:
        with engine.begin() as conn:
            conn.execute(insert(IndexVersion).values(version="1", **row))
            conn.execute(insert(IndexVersion).values(version="2", **{**row, "active": False}))
            conn.execute(insert(IndexVersion).values(version="1", **{**row, "name": "b"}))
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(insert(IndexVersion).values(version="3", **row))
    finally:
        engine.dispose()


def test_check_at_head_refuses_an_unmigrated_database(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with pytest.raises(SchemaNotAtHeadError) as err:
            check_at_head(engine)
        assert err.value.status == 503
        assert "geoloc db upgrade" in err.value.detail
        upgrade(db_url)
        assert check_at_head(engine) == head_revision()
        downgrade(db_url, "base")
        with pytest.raises(SchemaNotAtHeadError):
            check_at_head(engine)
    finally:
        engine.dispose()


def test_check_at_head_names_a_revision_it_does_not_know(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffffffffffff'")
        with pytest.raises(SchemaNotAtHeadError, match="does not know"):
            check_at_head(engine)
    finally:
        engine.dispose()


def test_bad_revision_is_one_clear_error(db_url: str) -> None:
    from service.errors import GeolocError

    with pytest.raises(GeolocError, match="cannot upgrade"):
        upgrade(db_url, "nosuchrevision")
    assert tables(db_url) == set()


def test_alembic_ini_at_repo_root_runs_the_same_migrations(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`alembic upgrade head` by hand: the URL comes from the config, else from Settings."""
    monkeypatch.chdir(REPO)
    cfg = Config(str(REPO / "alembic.ini"))
    cfg.attributes["configure_logger"] = False
    monkeypatch.setenv("GEOLOC_DATABASE_URL", db_url)  # no sqlalchemy.url: env.py asks Settings
    command.upgrade(cfg, "head")
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) == head_revision()
        cfg.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
        command.downgrade(cfg, "base")
        assert current_revision(engine) is None
    finally:
        engine.dispose()


def test_ddl_is_transactional(db_url: str) -> None:
    """A migration that fails half-way leaves nothing behind, on SQLite too (make_engine opens
    the transaction itself; pysqlite's own would skip DDL)."""
    engine = make_engine(db_url)
    try:
        with pytest.raises(RuntimeError), engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE half_done (id INTEGER)")
            raise RuntimeError("migration failed")
        assert "half_done" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()
