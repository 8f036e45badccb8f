"""The database schema's migrations (Alembic): upgrade, downgrade and the head check."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from service.db.session import _WRITE_OPTION, display_url, make_engine
from service.errors import GeolocError, InvalidOptionError

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


class SchemaNotAtHeadError(GeolocError):
    type = "schema-not-at-head"
    status = 503
    title = "Database schema out of date"


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


#: PostgreSQL advisory lock key of migrations (any fixed bigint unique to this purpose).
_MIGRATION_LOCK_KEY = 0x67656F6C6F63  # "geoloc"


def _run_alembic(url: str | URL, fn: str, rev: str, wait_s: float = 15.0) -> str | None:
    # A write transaction on SQLite (IMMEDIATE: the second migrator waits at BEGIN). Either
    # database: a migrator waits up to ``wait_s`` for another's lock.
    engine = make_engine(url, wait_s).execution_options(**{_WRITE_OPTION: True})
    try:
        with engine.begin() as conn:  # one transaction: a failed migration leaves nothing
            if conn.dialect.name == "postgresql":
                # Replicas that start together migrate one after the other: the others wait
                # here (up to wait_s), then find the schema at head and do nothing.
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
            cfg = _alembic_config()
            cfg.attributes["connection"] = conn
            try:
                getattr(command, fn)(cfg, rev)
            except CommandError as exc:
                raise InvalidOptionError(f"cannot {fn} the database to {rev!r}: {exc}") from None
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def upgrade(url: str | URL, rev: str = "head", wait_s: float = 15.0) -> str | None:
    """Migrate the database up to ``rev`` (waiting up to ``wait_s`` for another migrator);
    returns the revision it is at afterwards."""
    return _run_alembic(url, "upgrade", rev, wait_s)


def downgrade(url: str | URL, rev: str = "base") -> str | None:
    """Migrate the database down to ``rev`` ("base" drops every table); returns the revision."""
    return _run_alembic(url, "downgrade", rev)


def current_revision(engine: Engine) -> str | None:
    """The database's Alembic revision; None for an empty database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_alembic_config())


def head_revision() -> str:
    """The newest revision this code knows."""
    head = _script().get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def check_at_head(engine: Engine) -> str:
    """Refuse to use a database whose schema is not the one this code was written for."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return head
    where = display_url(engine.url)
    if current is None:
        detail = f"the database {where} has no geoloc schema yet: run `geoloc db upgrade`"
    elif current not in {s.revision for s in _script().walk_revisions()}:
        detail = (
            f"the database {where} is at schema revision {current}, which this geoloc does not "
            f"know (a newer geoloc migrated it?); install that version, or run `geoloc db "
            f"upgrade` from it; this one needs {head}"
        )
    else:
        detail = (
            f"the database {where} is at schema revision {current} but this geoloc needs "
            f"{head}: run `geoloc db upgrade`"
        )
    raise SchemaNotAtHeadError(detail)
