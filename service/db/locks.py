"""The index build lock: one build of an index name at a time, across processes and hosts."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import URL

from service.db.session import _parse_url, display_url, make_engine
from service.errors import GeolocError


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
