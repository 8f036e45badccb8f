"""Database engine, migrations and repository functions. No HTTP here: the app and the CLI call
these with a Session.

Transactions: every function that writes commits before it returns (each is one unit of work),
so callers need no transaction code; on an error it rolls back. Sessions from
``make_sessionmaker`` keep loaded attributes after commit (``expire_on_commit=False``), so a
returned row can be read after its session is closed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import math
import secrets
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, create_engine, event, func, select, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from index.geo import haversine_km
from index.store import Manifest, list_indexes
from service.errors import GeolocError, InvalidOptionError, NotFoundError
from service.evaluation import region_areas, report
from service.models import (
    SCOPES,
    ApiKey,
    Feedback,
    IndexVersion,
    Prediction,
    utcnow,
)
from service.problems import DatabaseUnavailableError

__all__ = [
    "KEY_PREFIX",
    "IndexBuildLockedError",
    "SchemaNotAtHeadError",
    "activate_index",
    "active_index_version",
    "add_feedback",
    "authenticate",
    "check_at_head",
    "create_api_key",
    "current_revision",
    "display_url",
    "downgrade",
    "error_line",
    "get_prediction",
    "head_revision",
    "index_build_lock",
    "list_api_keys",
    "list_index_versions",
    "make_engine",
    "make_sessionmaker",
    "prediction_stats",
    "record_prediction",
    "register_index_version",
    "revoke_api_key",
    "sync_index_versions",
    "upgrade",
    "wait_for_database",
]

# migrations/ is a sibling package of service/, both in a checkout and once installed.
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
KEY_PREFIX = "glk_"
PREFIX_LEN = 8
# last_used_at is refreshed at most this often: a write per request would cost more than the
# minute of precision is worth.
LAST_USED_PRECISION = timedelta(minutes=1)


class SchemaNotAtHeadError(GeolocError):
    type = "schema-not-at-head"
    status = 503
    title = "Database schema out of date"


# -- engine ------------------------------------------------------------------------------------


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


def _sqlite_begin(conn: Connection) -> None:
    # A write transaction (see ``_begin_write``) takes the write lock at BEGIN, where the busy
    # timeout waits for it; a deferred one that reads and then writes fails at once ("database
    # is locked") when another writer committed in between. Readers stay deferred: WAL lets
    # them run beside the writer.
    write = conn.get_execution_options().get(_WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


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
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_begin)
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


# -- migrations --------------------------------------------------------------------------------


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


# -- index build lock ----------------------------------------------------------------------------


class IndexBuildLockedError(GeolocError):
    type = "index-build-in-progress"
    status = 409
    title = "Index build in progress"


def _build_lock_key(name: str) -> int:
    # PostgreSQL advisory locks take one bigint: 8 bytes of a hash of the purpose and the name.
    digest = hashlib.sha256(f"geoloc:index-build:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def index_build_lock(url: str | URL, name: str, connect_timeout_s: float = 5.0) -> Iterator[None]:
    """Hold the build lock of index ``name`` (IndexBuildLockedError at once if another build
    of that name holds it). The lock dies with its holder: a killed build leaves none behind.

    PostgreSQL: a session advisory lock on a connection kept open for the build. SQLite: an
    exclusive ``flock`` on a file beside the database (SQLite is single-host; a write
    transaction held for the whole build would stall every prediction write meanwhile).
    """
    u = _parse_url(url)
    busy = IndexBuildLockedError(
        f"another build of index {name!r} is running (it holds the build lock in "
        f"{display_url(u)}); wait for it to finish"
    )
    if u.get_backend_name() == "sqlite":
        db = u.database
        if not db or db == ":memory:" or db.startswith("file:"):
            yield  # no file, no other process to exclude
            return
        path = Path(f"{db}.build-{name}.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise busy from None
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return
    engine = make_engine(u, connect_timeout_s=connect_timeout_s)
    key = _build_lock_key(name)
    try:
        with engine.connect() as conn:
            got = conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({key})").scalar()
            conn.commit()  # a session lock outlives the transaction that took it
            if not got:
                raise busy
            try:
                yield
            finally:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({key})")
                conn.commit()
    finally:
        engine.dispose()


# -- predictions and feedback ------------------------------------------------------------------


def _float_or_none(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _aware(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def record_prediction(
    session: Session,
    *,
    profile: str,
    index_version: str,
    result: dict[str, Any],
    latency_ms: float,
    api_key_id: int | None = None,
    client: str | None = None,
    prediction_id: str | None = None,
) -> str:
    """Store one locate result; returns the prediction id (32 hex characters; a caller may
    choose it beforehand, e.g. to log with it while the request runs)."""
    _begin_write(session)
    candidates = result.get("candidates") or []
    top = candidates[0] if candidates and isinstance(candidates[0], dict) else {}
    pred = Prediction(
        id=prediction_id or uuid.uuid4().hex,
        created_at=utcnow(),
        profile=profile,
        index_version=index_version,
        lat=_float_or_none(top.get("lat")),
        lon=_float_or_none(top.get("lon")),
        probability=_float_or_none(top.get("probability")),
        response=result,  # made JSON-safe when written (_json_dumps)
        latency_ms=float(latency_ms),
        api_key_id=api_key_id,
        client=client[:255] if client else None,
    )
    session.add(pred)
    _commit(session)
    return pred.id


def get_prediction(session: Session, prediction_id: str) -> Prediction | None:
    if not isinstance(prediction_id, str) or len(prediction_id) > 32:
        return None
    return session.get(Prediction, prediction_id)


def _check_latlon(lat: Any, lon: Any) -> tuple[float, float]:
    out = []
    for what, value, limit in (("lat", lat, 90.0), ("lon", lon, 180.0)):
        # bool is an int to Python, but True is not a coordinate.
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise InvalidOptionError(f"{what} must be a number, got {value!r}")
        f = float(value)
        if not math.isfinite(f) or not -limit <= f <= limit:
            raise InvalidOptionError(f"{what} must be a finite number in [-{limit:g}, {limit:g}]")
        out.append(f)
    return out[0], out[1]


def add_feedback(session: Session, prediction_id: str, lat: float, lon: float) -> Feedback:
    """Record the true location of a prediction and its top-1 error in km.

    One feedback per prediction: a second call replaces the first (same row, new lat/lon,
    error_km and created_at), so a user can correct a mistake.
    """
    _begin_write(session)
    lat_f, lon_f = _check_latlon(lat, lon)
    pred = get_prediction(session, prediction_id)
    if pred is None:
        raise NotFoundError(f"no prediction with id {prediction_id!r}")
    error_km = None
    if pred.lat is not None and pred.lon is not None:
        error_km = float(haversine_km(pred.lat, pred.lon, lat_f, lon_f))
    values = {"lat": lat_f, "lon": lon_f, "error_km": error_km, "created_at": utcnow()}

    def existing() -> Feedback | None:
        return session.scalar(select(Feedback).where(Feedback.prediction_id == pred.id))

    fb = existing()
    if fb is None:
        try:
            with session.begin_nested():  # a savepoint: losing a race must not undo the rest
                fb = Feedback(prediction_id=pred.id, **values)
                session.add(fb)
        except IntegrityError:
            fb = existing()  # a concurrent request inserted it first: replace theirs
            if fb is None:
                raise
    for key, value in values.items():
        setattr(fb, key, value)
    _commit(session)
    return fb


def prediction_stats(
    session: Session,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    within_km: float = 50.0,
    bins: int = 10,
    max_rows: int = 50_000,
) -> dict[str, Any]:
    """Counts and accuracy of predictions made in [since, until) (open ends when None).

    Accuracy is measured on the predictions with feedback that had a candidate (the newest
    ``max_rows``) with the metrics of ``geoloc eval``: share within 1/25/200/750/2500 km,
    median and mean km, mean GeoScore, Recall-vs-Area of each stored uncertainty region
    (a truth outside the returned region is not found) and the calibration of the top-1
    probability for "within ``within_km``"; None where there is nothing to measure.
    """
    window = []
    if since is not None:
        window.append(Prediction.created_at >= _aware(since))
    if until is not None:
        window.append(Prediction.created_at < _aware(until))
    count_q = select(func.count()).select_from(Prediction).where(*window)
    fb_q = (
        select(func.count())
        .select_from(Feedback)
        .join(Prediction, Feedback.prediction_id == Prediction.id)
        .where(*window)
    )
    rows_q = (
        select(
            Feedback.error_km,
            Feedback.lat,
            Feedback.lon,
            Prediction.probability,
            # Only the region's cells and resolution: its GeoJSON is the bulk of a response.
            Prediction.response[("region", "cells")],
            Prediction.response[("region", "h3_resolution")],
        )
        .join(Prediction, Feedback.prediction_id == Prediction.id)
        .where(*window, Feedback.error_km.is_not(None))
        .order_by(Prediction.created_at.desc())
        .limit(max_rows)
    )
    rows = session.execute(rows_q).all()
    d = np.array([r[0] for r in rows], dtype=np.float64)
    conf = np.array([_float_or_none(r[3]) or 0.0 for r in rows], dtype=np.float64)
    areas = region_areas(
        [{"cells": cells, "h3_resolution": res} for *_, cells, res in rows],
        [(lat, lon) for _, lat, lon, *_ in rows],
    )
    rep = report(d, conf, areas, within_km=within_km, bins=bins)
    return {
        "predictions": int(session.scalar(count_q) or 0),
        "with_feedback": int(session.scalar(fb_q) or 0),
        "measured": len(rows),
        **{k: rep[k] for k in ("within_km", "median_km", "mean_km", "mean_geoscore")},
        "recall_vs_area": rep["recall_vs_area"],
        "calibration": rep["calibration"],
    }


# -- index versions ----------------------------------------------------------------------------


def _manifest_time(text: str) -> datetime:
    try:
        return _aware(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        return utcnow()


def _find_version(session: Session, name: str, version: str) -> IndexVersion | None:
    return session.scalar(
        select(IndexVersion).where(IndexVersion.name == name, IndexVersion.version == version)
    )


def register_index_version(session: Session, manifest: Manifest, path: str | Path) -> IndexVersion:
    """Record a published index version; registering it again refreshes it from its manifest
    (the files on disk are the truth) and keeps whether it is active."""
    _begin_write(session)
    values = {
        "profile": manifest.profile,
        "gallery_kind": manifest.gallery_kind,
        "count": int(manifest.count),
        "path": str(path),
        "manifest": json.loads(manifest.to_json()),
        "created_at": _manifest_time(manifest.created_at),
    }
    row = _find_version(session, manifest.name, manifest.version)
    if row is None:
        try:
            with session.begin_nested():
                row = IndexVersion(
                    name=manifest.name, version=manifest.version, active=False, **values
                )
                session.add(row)
        except IntegrityError:
            row = _find_version(session, manifest.name, manifest.version)  # another replica won
            if row is None:
                raise
    for key, value in values.items():
        setattr(row, key, value)
    _commit(session)
    return row


def sync_index_versions(session: Session, root: str | Path) -> list[IndexVersion]:
    """Register every published version under ``root`` (so versions built before the database
    existed appear). Versions deleted from disk keep their rows: they are history."""
    base = Path(root).resolve() / "indexes"  # index.store's layout: <root>/indexes/<name>/<ver>
    return [
        register_index_version(session, m, base / m.name / m.version) for m in list_indexes(root)
    ]


def list_index_versions(session: Session, name: str | None = None) -> list[IndexVersion]:
    q = select(IndexVersion).order_by(IndexVersion.name, IndexVersion.version)
    if name is not None:
        q = q.where(IndexVersion.name == name)
    return list(session.scalars(q))


def activate_index(session: Session, name: str, version: str) -> IndexVersion:
    """Make ``name/version`` the one active version of ``name``, in one transaction."""
    _begin_write(session)
    # Lock every row of this name (PostgreSQL; SQLite serialises writers anyway) so concurrent
    # activations run one after the other; ordered by id so they never deadlock.
    rows = session.scalars(
        select(IndexVersion)
        .where(IndexVersion.name == name)
        .order_by(IndexVersion.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    target = next((r for r in rows if r.version == version), None)
    if target is None:
        session.rollback()
        known = [r.version for r in rows]
        raise NotFoundError(
            f"index {name!r} has no registered version {version!r}; known versions: "
            f"{known or 'none'}; build one with `geoloc index build`"
        )
    try:
        # Deactivate first, in its own statement: the partial unique index allows one active
        # row per name at every moment, not only at commit.
        session.execute(
            update(IndexVersion)
            .where(
                IndexVersion.name == name,
                IndexVersion.id != target.id,
                IndexVersion.active.is_(True),
            )
            .values(active=False)
        )
        session.execute(
            update(IndexVersion).where(IndexVersion.id == target.id).values(active=True)
        )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return target


def active_index_version(session: Session, name: str) -> IndexVersion | None:
    return session.scalar(
        select(IndexVersion).where(IndexVersion.name == name, IndexVersion.active.is_(True))
    )


# -- API keys ----------------------------------------------------------------------------------


def _hash_key(plaintext: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def _check_scopes(scopes: Iterable[str]) -> list[str]:
    wanted = sorted({s.strip().lower() for s in scopes if s.strip()})
    unknown = [s for s in wanted if s not in SCOPES]
    if unknown:
        raise InvalidOptionError(f"unknown scope(s) {unknown}; known: {sorted(SCOPES)}")
    if not wanted:
        raise InvalidOptionError(f"an API key needs at least one scope: {sorted(SCOPES)}")
    return wanted


def create_api_key(session: Session, name: str, scopes: Sequence[str]) -> tuple[str, ApiKey]:
    """A new key: returns (plaintext, row). The plaintext is not stored and never shown again."""
    _begin_write(session)
    name = name.strip()
    if not name or len(name) > 100:
        raise InvalidOptionError("an API key needs a name of 1-100 characters")
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        name=name,
        prefix=plaintext[:PREFIX_LEN],
        key_hash=_hash_key(plaintext),
        scopes=",".join(_check_scopes(scopes)),
        created_at=utcnow(),
    )
    session.add(row)
    _commit(session)
    return plaintext, row


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_api_key(session: Session, key_id_or_prefix: int | str) -> ApiKey:
    """Revoke a key by id, prefix (as listed) or the whole key. Revoking twice is a no-op."""
    _begin_write(session)
    ref = str(key_id_or_prefix).strip()
    if ref.isdigit():
        rows = list(session.scalars(select(ApiKey).where(ApiKey.id == int(ref))))
    elif ref.startswith(KEY_PREFIX) and len(ref) > PREFIX_LEN:
        rows = list(session.scalars(select(ApiKey).where(ApiKey.key_hash == _hash_key(ref))))
    else:
        rows = list(session.scalars(select(ApiKey).where(ApiKey.prefix == ref)))
    if not rows:
        raise NotFoundError(f"no API key with id or prefix {ref!r}; see `geoloc apikey list`")
    if len(rows) > 1:
        ids = ", ".join(str(r.id) for r in rows)
        raise InvalidOptionError(f"prefix {ref!r} matches keys {ids}: revoke by id")
    row = rows[0]
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        _commit(session)
    return row


def authenticate(session: Session, plaintext: str) -> ApiKey | None:
    """The live key matching ``plaintext``, or None (unknown, malformed or revoked)."""
    if not isinstance(plaintext, str) or not plaintext.startswith(KEY_PREFIX):
        return None
    digest = _hash_key(plaintext)
    candidates = session.scalars(select(ApiKey).where(ApiKey.prefix == plaintext[:PREFIX_LEN]))
    for row in candidates:
        if hmac.compare_digest(row.key_hash, digest):
            if row.revoked_at is not None:
                return None
            now = utcnow()
            if row.last_used_at is None or now - row.last_used_at >= LAST_USED_PRECISION:
                # End the read before writing: the write transaction must begin as one.
                _commit(session)
                _begin_write(session)
                row.last_used_at = now
                _commit(session)
            return row
    return None


def _commit(session: Session) -> None:
    try:
        session.commit()
    except BaseException:
        session.rollback()
        raise
