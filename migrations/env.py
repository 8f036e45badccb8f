"""Alembic environment for geoloc.

The database URL is, in order: a connection handed over in ``config.attributes["connection"]``
(``service.db.upgrade`` and pytest-alembic do this), ``sqlalchemy.url`` in the alembic config
(tests set it), else ``Settings().db_url`` (GEOLOC_DATABASE_URL or SQLite under the data dir).
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection, Engine

from service.db import make_engine
from service.db.models import Base

config = context.config
target_metadata = Base.metadata

# Only the `alembic` command line has an ini file to configure logging from; called from
# geoloc or the tests, logging belongs to the caller.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    # Imported here: Settings pulls in the model code (torch), slow and not needed otherwise.
    from service.config import Settings

    return Settings().db_url


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    dialect = connection.dialect.name if connection is not None else (url or "").split(":")[0]
    context.configure(
        connection=connection,
        url=url if connection is None else None,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: batch mode copies the table instead.
        render_as_batch=dialect.startswith("sqlite"),
        compare_type=True,
        literal_binds=connection is None,
        dialect_opts={"paramstyle": "named"} if connection is None else {},
    )


def run_migrations_offline() -> None:
    """`alembic upgrade --sql`: print the SQL instead of running it."""
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        _run(given)  # the caller owns this connection's transaction and commits it
        return
    # pytest-alembic hands over an Engine; otherwise we make (and dispose of) our own.
    engine = given if isinstance(given, Engine) else make_engine(_url())
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        if engine is not given:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
