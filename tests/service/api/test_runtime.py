"""What a replica's state makes of a database that cannot store: readiness turns 503 at the
next check, nothing is acknowledged meanwhile, and it recovers by itself."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from service import db
from service.api.runtime import build_state
from service.config import Settings
from service.errors import DatabaseUnavailableError


def _chattr(flag: str, files: list[Path]) -> None:
    subprocess.run(["chattr", flag, *map(str, files)], check=True, capture_output=True)


@pytest.fixture
def immutable(tmp_path: Path):
    """A function that makes files immutable (chattr +i) until the test ends; skips where
    the file system or the user cannot."""
    probe = tmp_path / "probe"
    probe.write_text("x")
    if shutil.which("chattr") is None:
        pytest.skip("no chattr here")
    try:
        _chattr("+i", [probe])
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make files immutable here: {exc.stderr.strip()}")
    _chattr("-i", [probe])
    made: list[Path] = []

    def make(files: list[Path]) -> None:
        _chattr("+i", files)
        made.extend(files)

    yield make
    left = [f for f in made if f.exists()]
    if left:  # never leave undeletable files behind, whatever the test did
        _chattr("-i", left)


def test_immutable_sqlite_files_make_the_replica_not_ready_and_store_nothing(
    tmp_path: Path, immutable
) -> None:
    s = Settings(data_dir=tmp_path / "data")
    db.upgrade(s.db_url)
    state = build_state(s)
    state.engine = db.make_engine(s.db_url, wait_s=2)
    state.sessions = db.make_sessionmaker(state.engine)
    state.check_database()
    assert state.db_error is None
    with state.sessions() as session:
        db.record_prediction(
            session, profile="bluemarble", index_version="i/v1", result={}, latency_ms=1.0
        )

    files = sorted((tmp_path / "data").glob("geoloc.db*"))
    immutable(files)
    state.check_database()  # the poll: no SQLite call touches the files (it would SIGBUS)
    assert state.db_error is not None and "cannot be written" in state.db_error
    with pytest.raises(DatabaseUnavailableError):
        state.require_sessions()  # endpoints that need the database answer 503
    _chattr("-i", files)

    state.check_database()  # recovery needs no restart
    assert state.db_error is None
    with state.sessions() as session:
        pid = db.record_prediction(
            session, profile="bluemarble", index_version="i/v1", result={}, latency_ms=1.0
        )
        assert db.get_prediction(session, pid) is not None
    state.engine.dispose()
