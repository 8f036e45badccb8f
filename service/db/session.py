"""Database engines and sessions (SQLite or PostgreSQL), and how a write transaction begins
and commits.

Transactions: every repository function that writes commits before it returns (each is one
unit of work), so callers need no transaction code; on an error it rolls back. Sessions from
``make_sessionmaker`` keep loaded attributes after commit (``expire_on_commit=False``), so a
returned row can be read after its session is closed.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.errors import DatabaseUnavailableError, InvalidOptionError


def _parse_url(url: str | URL) -> URL:
    try:
        u = make_url(url)
    except ArgumentError as exc:
        raise InvalidOptionError(
            f"invalid database URL ({exc}); set GEOLOC_DATABASE_URL to e.g. "
            "postgresql+psycopg://user:password@host:5432/geoloc, or leave it empty for SQLite"
        ) from None
    # Plain "postgresql://" (and Heroku's "postgres://") mean psycopg2 to SQLAlchemy, which is not
    # a dependency: use psycopg 3.
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def display_url(url: str | URL) -> str:
    """The URL without its password, for messages."""
    return _parse_url(url).render_as_string(hide_password=True)


def _jsonable(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays become Python, NaN/inf become null (PostgreSQL's
    json type rejects NaN), unknown objects become their str()."""
    if obj is None or isinstance(obj, str | bool | int):
        return obj
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer | np.bool_):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, datetime):
        return obj.isoformat()
    return str(obj)


def _json_dumps(obj: Any) -> str:
    try:  # most values are JSON-safe already (API responses): skip the copy
        return json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(_jsonable(obj), allow_nan=False)


_WRITE_OPTION = "geoloc_write"


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook below open transactions: pysqlite's own BEGIN comes late
    # and skips DDL, which would make migrations non-transactional.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    # With WAL, NORMAL syncs at checkpoints instead of every commit: a crash of the process
    # loses nothing, a power cut may lose the last commits, and the file stays consistent.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")  # off by default in SQLite
    cur.close()


_FILE_KEY = "geoloc_file"


def _file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path`` now; None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _unwritable(path: str) -> bool:
    """Whether a file exists and this process may not write it."""
    return os.path.exists(path) and not os.access(path, os.W_OK)


def _sqlite_listeners(path: str | None) -> tuple[Any, Any]:
    """The "connect" and "begin" hooks of a SQLite engine on the file ``path`` (None: memory)."""

    def on_connect(dbapi_conn: Any, record: Any) -> None:
        _sqlite_on_connect(dbapi_conn, record)
        if path is not None:
            record.info[_FILE_KEY] = _file_identity(path)

    def on_begin(conn: Connection) -> None:
        # A write transaction (see ``_begin_write``) takes the write lock at BEGIN, where the
        # busy timeout waits for it; a deferred one that reads and then writes fails at once
        # ("database is locked") when another writer committed in between. Readers stay
        # deferred: WAL lets them run beside the writer.
        write = conn.get_execution_options().get(_WRITE_OPTION, False)
        if write and path is not None:
            # A connection keeps writing to the file it opened, even after that file was
            # deleted or replaced: the rows would be acknowledged and lost. Refuse instead.
            opened = conn.connection.info.get(_FILE_KEY)
            if opened != _file_identity(path):
                conn.invalidate()  # the next connection opens what is at the path now
                raise OperationalError(
                    "BEGIN IMMEDIATE",
                    None,
                    sqlite3.OperationalError(
                        f"the database file {path} was deleted or replaced after it was opened"
                    ),
                )
            # A file that cannot be written (read-only, immutable, a read-only mount) is
            # refused here, before SQLite writes into its memory-mapped -shm file: that write
            # would kill the process (SIGBUS) rather than fail.
            locked = [f for f in (path, f"{path}-wal", f"{path}-shm") if _unwritable(f)]
            if locked:
                raise OperationalError(
                    "BEGIN IMMEDIATE",
                    None,
                    sqlite3.OperationalError(f"the database file {locked[0]} cannot be written"),
                )
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return on_connect, on_begin


def check_writable(engine: Engine) -> None:
    """Begin a write transaction and roll it back: raises (SQLAlchemyError) unless the database
    would take a write now (SQLite: the file at its path, not read-only; PostgreSQL: not a
    read-only server or transaction)."""
    with Session(engine) as session:
        _begin_write(session)
        # PostgreSQL: a write that touches no row, refused by a read-only transaction (a
        # standby, or default_transaction_read_only) as the prediction's INSERT would be; no
        # row lock. Without the schema there is nothing to write to; check_at_head says so.
        if (
            engine.url.get_backend_name() == "postgresql"
            and session.execute(text("SELECT to_regclass('predictions')")).scalar() is not None
        ):
            session.execute(text("DELETE FROM predictions WHERE false"))
        session.rollback()


def _begin_write(session: Session) -> None:
    """Open the session's transaction as a write transaction (IMMEDIATE on SQLite)."""
    if not session.in_transaction():
        session.connection(execution_options={_WRITE_OPTION: True})


def make_engine(url: str | URL, wait_s: float = 15.0, connect_timeout_s: float = 5.0) -> Engine:
    """An Engine for SQLite (file or memory) or PostgreSQL (psycopg 3).

    ``wait_s`` bounds how long a statement waits for another transaction's lock before it
    fails (SQLite's busy timeout, PostgreSQL's ``lock_timeout``); ``connect_timeout_s`` bounds
    one connection attempt to PostgreSQL (an unreachable host must not hang a request).
    """
    u = _parse_url(url)
    if u.get_backend_name() == "sqlite":
        db = u.database
        if db and db != ":memory:" and not db.startswith("file:"):
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            u,
            # check_same_thread: the app's threads share the pool.
            connect_args={"check_same_thread": False, "timeout": wait_s},
            json_serializer=_json_dumps,
        )
        on_connect, on_begin = _sqlite_listeners(
            db if db and db != ":memory:" and not db.startswith("file:") else None
        )
        event.listen(engine, "connect", on_connect)
        event.listen(engine, "begin", on_begin)
        return engine
    # pre_ping: replicas outlive database restarts and idle-connection reaping.
    return create_engine(
        u,
        pool_pre_ping=True,
        json_serializer=_json_dumps,
        connect_args={
            "options": f"-c lock_timeout={int(wait_s * 1000)}",
            "connect_timeout": max(1, round(connect_timeout_s)),
        },
    )


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def error_line(exc: SQLAlchemyError) -> str:
    """The driver's own message, first line (SQLAlchemy appends the SQL and a help link)."""
    orig = getattr(exc, "orig", None)
    return (str(orig or exc).strip().splitlines() or [type(exc).__name__])[0]


def wait_for_database(url: str | URL, timeout_s: float, connect_timeout_s: float = 5.0) -> None:
    """Return once the database accepts connections; DatabaseUnavailableError after
    ``timeout_s`` (a container starting beside its database gets there first)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.25
    engine = make_engine(url, connect_timeout_s=min(connect_timeout_s, timeout_s))
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")
                return
            except OperationalError as exc:
                last = error_line(exc)
            left = deadline - time.monotonic()
            if left <= 0:
                raise DatabaseUnavailableError(
                    f"{display_url(url)} did not accept a connection within {timeout_s:g} s "
                    f"(GEOLOC_DATABASE_START_TIMEOUT_S): {last}"
                )
            time.sleep(min(delay, left))
            delay = min(delay * 2, 2.0)
    finally:
        engine.dispose()


def _commit(session: Session) -> None:
    try:
        session.commit()
    except BaseException:
        session.rollback()
        raise
