"""Repository functions and the database CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from index.store import Manifest
from service import db
from service.cli.main import app
from service.db.models import ApiKey, Feedback, IndexVersion, Prediction
from service.engine.scores import feedback_report
from service.errors import InvalidOptionError, NotFoundError

PARIS = (48.8566, 2.3522)
LONDON = (51.5074, -0.1278)
PARIS_LONDON_KM = 343.5  # great-circle distance, R = 6371.0088 km


def result_at(lat: float, lon: float, p: float = 0.6) -> dict[str, Any]:
    return {
        "profile": "bluemarble",
        "index": "default-bluemarble/v1",
        "candidates": [
            {"lat": lat, "lon": lon, "probability": p, "h3": "84194adffffffff"},
            {"lat": 0.0, "lon": 0.0, "probability": 1 - p, "h3": "847559dffffffff"},
        ],
        "stages": ["retrieve", "verify"],
    }


def predict(session: Session, lat: float, lon: float) -> str:
    return db.record_prediction(
        session,
        profile="bluemarble",
        index_version="default-bluemarble/v1",
        result=result_at(lat, lon),
        latency_ms=12.5,
    )


# -- predictions and feedback ------------------------------------------------------------------


def test_record_and_get_prediction(session: Session) -> None:
    result = result_at(*PARIS)
    result["extra"] = {"score": np.float32(0.25), "area": float("nan"), "ids": np.arange(3)}
    pid = db.record_prediction(
        session,
        profile="bluemarble",
        index_version="default-bluemarble/v1",
        result=result,
        latency_ms=12.5,
        client="203.0.113.7",
    )
    assert len(pid) == 32 and int(pid, 16) >= 0
    session.expunge_all()  # read it back from the database, not from the session
    pred = db.get_prediction(session, pid)
    assert pred is not None
    assert (pred.lat, pred.lon, pred.probability) == (*PARIS, 0.6)
    assert pred.profile == "bluemarble" and pred.index_version == "default-bluemarble/v1"
    assert pred.latency_ms == 12.5 and pred.client == "203.0.113.7" and pred.api_key_id is None
    assert pred.response["candidates"][0]["h3"] == "84194adffffffff"
    # numpy became JSON, NaN became null (PostgreSQL's json rejects NaN)
    assert pred.response["extra"] == {"score": 0.25, "area": None, "ids": [0, 1, 2]}
    assert pred.created_at.tzinfo is not None and pred.created_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - pred.created_at) < timedelta(minutes=1)
    assert db.get_prediction(session, "0" * 32) is None
    assert db.get_prediction(session, "x" * 100) is None


def test_prediction_without_candidates_has_no_top1(session: Session) -> None:
    pid = db.record_prediction(
        session, profile="p", index_version="a/b", result={"candidates": []}, latency_ms=1
    )
    pred = db.get_prediction(session, pid)
    assert pred is not None and pred.lat is None and pred.probability is None
    fb = db.add_feedback(session, pid, *LONDON)
    assert fb.error_km is None


def test_feedback_error_km_paris_to_london(session: Session) -> None:
    pid = predict(session, *PARIS)
    fb = db.add_feedback(session, pid, *LONDON)
    assert fb.prediction_id == pid
    assert fb.error_km == pytest.approx(PARIS_LONDON_KM, abs=1.0)
    session.expunge_all()
    stored = session.scalar(select(Feedback).where(Feedback.prediction_id == pid))
    assert stored is not None and stored.error_km == pytest.approx(PARIS_LONDON_KM, abs=1.0)
    assert (stored.lat, stored.lon) == LONDON


def test_second_feedback_replaces_the_first(session: Session) -> None:
    pid = predict(session, *PARIS)
    first = db.add_feedback(session, pid, *LONDON)
    second = db.add_feedback(session, pid, *PARIS)
    assert second.id == first.id
    rows = session.scalars(select(Feedback)).all()
    assert len(rows) == 1
    assert (rows[0].lat, rows[0].lon) == PARIS and rows[0].error_km == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("lat", "lon"),
    [
        (float("nan"), 0.0),
        (0.0, float("inf")),
        (90.5, 0.0),
        (-91, 0.0),
        (0.0, 180.01),
        (0.0, -181),
        ("48.8", 2.3),
        (True, 2.3),
        (None, 2.3),
    ],
)
def test_feedback_with_bad_coordinates_is_refused(session: Session, lat: Any, lon: Any) -> None:
    pid = predict(session, *PARIS)
    with pytest.raises(InvalidOptionError):
        db.add_feedback(session, pid, lat, lon)
    assert session.scalar(select(func.count()).select_from(Feedback)) == 0


def test_feedback_edges_are_accepted(session: Session) -> None:
    pid = predict(session, *PARIS)
    assert db.add_feedback(session, pid, 90, -180).lat == 90.0
    assert db.add_feedback(session, pid, np.float64(-90.0), 180.0).lon == 180.0


def test_feedback_for_unknown_prediction(session: Session) -> None:
    with pytest.raises(NotFoundError, match="no prediction"):
        db.add_feedback(session, "f" * 32, *LONDON)
    assert session.scalar(select(func.count()).select_from(Feedback)) == 0


def prediction_stats(session: Session, since: datetime | None = None) -> dict:
    """The statistics /v1/stats serves: the database's sample, measured."""
    return feedback_report(**vars(db.feedback_sample(session, since=since)))


def test_prediction_stats(session: Session) -> None:
    empty = prediction_stats(session)
    assert empty["predictions"] == 0 and empty["with_feedback"] == 0
    assert empty["median_km"] is None and empty["within_km"]["25"] is None

    exact = predict(session, *PARIS)
    near = predict(session, *PARIS)
    far = predict(session, 0.0, 0.0)
    predict(session, 10.0, 10.0)  # no feedback
    db.add_feedback(session, exact, *PARIS)  # 0 km
    db.add_feedback(session, near, *LONDON)  # ~343 km
    db.add_feedback(session, far, -33.87, 151.21)  # Sydney: far beyond 2500 km

    stats = prediction_stats(session)
    assert stats["predictions"] == 4
    assert stats["with_feedback"] == 3
    within = stats["within_km"]
    assert set(within) == {"1", "25", "200", "750", "2500"}
    assert within["1"] == pytest.approx(1 / 3) and within["200"] == pytest.approx(1 / 3)
    assert within["750"] == pytest.approx(2 / 3) and within["2500"] == pytest.approx(2 / 3)
    assert stats["median_km"] == pytest.approx(PARIS_LONDON_KM, abs=1.0)
    errors = [f.error_km for f in session.scalars(select(Feedback))]
    expected_score = np.mean([5000 * math.exp(-d / 1492.7) for d in errors])
    assert stats["mean_geoscore"] == pytest.approx(expected_score)

    # `since` counts predictions made since then (naive datetimes are UTC).
    session.execute(
        update(Prediction)
        .where(Prediction.id.in_([exact, far]))
        .values(created_at=datetime.now(UTC) - timedelta(days=2))
    )
    session.commit()
    recent = prediction_stats(session, since=datetime.now(UTC) - timedelta(days=1))
    assert recent["predictions"] == 2 and recent["with_feedback"] == 1
    assert recent["within_km"]["750"] == 1.0 and recent["within_km"]["25"] == 0.0
    naive = prediction_stats(
        session, since=datetime.now(UTC).replace(tzinfo=None) - timedelta(days=1)
    )
    assert naive["predictions"] == 2
    future = prediction_stats(session, since=datetime.now(UTC) + timedelta(hours=1))
    assert future["predictions"] == 0 and future["mean_geoscore"] is None


# -- index versions ----------------------------------------------------------------------------


def manifest(name: str, version: str, count: int = 10) -> Manifest:
    return Manifest(
        name=name,
        version=version,
        profile="bluemarble",
        dim=8,
        metric="ip",
        factory="Flat",
        gallery_kind="h3",
        h3_resolution=2,
        count=count,
        files={"index.faiss": "0" * 64},
        created_at="2024-05-01T12:00:00.000000Z",
        extra={},
    )


def active_by_name(session: Session) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    session.expire_all()
    for row in session.scalars(select(IndexVersion).where(IndexVersion.active.is_(True))):
        out.setdefault(row.name, []).append(row.version)
    return out


def test_register_index_version_is_idempotent(session: Session) -> None:
    a = db.register_index_version(session, manifest("a", "v1"), "/data/indexes/a/v1")
    b = db.register_index_version(session, manifest("a", "v1", count=11), "/data/indexes/a/v1")
    assert a.id == b.id and b.count == 11 and not b.active
    assert b.created_at == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert b.manifest["files"] == {"index.faiss": "0" * 64}
    assert session.scalar(select(func.count()).select_from(IndexVersion)) == 1


def test_activation_flips_exactly_one_version_per_name(session: Session) -> None:
    for name, version in [("a", "v1"), ("a", "v2"), ("a", "v3"), ("b", "v1")]:
        db.register_index_version(session, manifest(name, version), f"/x/{name}/{version}")
    assert db.active_index_version(session, "a") is None

    assert db.activate_index(session, "a", "v1").active
    assert active_by_name(session) == {"a": ["v1"]}
    db.activate_index(session, "a", "v3")
    assert active_by_name(session) == {"a": ["v3"]}
    db.activate_index(session, "b", "v1")
    assert active_by_name(session) == {"a": ["v3"], "b": ["v1"]}
    db.activate_index(session, "a", "v3")  # again: no change
    assert active_by_name(session) == {"a": ["v3"], "b": ["v1"]}
    active = db.active_index_version(session, "a")
    assert active is not None and active.version == "v3"
    # registering again keeps the flag
    db.register_index_version(session, manifest("a", "v3"), "/x/a/v3")
    assert active_by_name(session) == {"a": ["v3"], "b": ["v1"]}


def test_activating_an_unknown_version_is_refused(session: Session) -> None:
    db.register_index_version(session, manifest("a", "v1"), "/x/a/v1")
    db.activate_index(session, "a", "v1")
    with pytest.raises(NotFoundError, match=r"known versions: \['v1'\]"):
        db.activate_index(session, "a", "v9")
    with pytest.raises(NotFoundError, match="known versions: none"):
        db.activate_index(session, "nosuch", "v1")
    assert active_by_name(session) == {"a": ["v1"]}


def test_concurrent_activation_ends_with_one_active(engine: Engine) -> None:
    # PostgreSQL: the row lock orders them; SQLite: write transactions begin IMMEDIATE, so
    # the second waits for the first instead of failing with "database is locked".
    make = db.make_sessionmaker(engine)
    versions = [f"v{i}" for i in range(4)]
    with make() as s:
        for v in versions:
            db.register_index_version(s, manifest("a", v), f"/x/a/{v}")
    errors: list[BaseException] = []

    def worker(version: str, barrier: threading.Barrier) -> None:
        try:
            with make() as s:
                barrier.wait()
                db.activate_index(s, "a", version)
        except BaseException as exc:
            errors.append(exc)

    for round_ in range(15):
        barrier = threading.Barrier(len(versions))
        order = versions[round_ % 4 :] + versions[: round_ % 4]
        threads = [threading.Thread(target=worker, args=(v, barrier)) for v in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        with make() as s:
            active = active_by_name(s)
        assert len(active.get("a", [])) == 1, active
        assert active["a"][0] in versions


def test_sync_index_versions_from_disk(
    session: Session, tmp_path: Path, publish_tiny_index: Callable[..., Manifest]
) -> None:
    publish_tiny_index(tmp_path, "tiny", "v1")
    publish_tiny_index(tmp_path, "tiny", "v2")
    publish_tiny_index(tmp_path, "other", "v1")
    rows = db.sync_index_versions(session, tmp_path)
    assert sorted(r.label for r in rows) == ["other/v1", "tiny/v1", "tiny/v2"]
    for r in rows:
        assert Path(r.path) == tmp_path.resolve() / "indexes" / r.name / r.version
        assert (Path(r.path) / "manifest.json").is_file()
        assert r.count == 5 and r.gallery_kind == "csv" and r.profile == "bluemarble"
    db.sync_index_versions(session, tmp_path)
    assert session.scalar(select(func.count()).select_from(IndexVersion)) == 3
    assert [r.label for r in db.list_index_versions(session, "tiny")] == ["tiny/v1", "tiny/v2"]


# -- API keys ----------------------------------------------------------------------------------


def test_api_key_create_authenticate_revoke(session: Session, engine: Engine) -> None:
    key, row = db.create_api_key(session, "ci", ["locate", "admin"])
    assert key.startswith("glk_") and len(key) >= 40
    assert row.prefix == key[:8] and row.scopes == "admin,locate"
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert row.last_used_at is None and row.revoked_at is None

    found = db.authenticate(session, key)
    assert found is not None and found.id == row.id and found.scope_set == {"locate", "admin"}
    assert found.last_used_at is not None

    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert db.authenticate(session, wrong) is None
    assert db.authenticate(session, key[:8]) is None
    assert db.authenticate(session, "not-a-key") is None
    assert db.authenticate(session, "") is None

    other_key, other = db.create_api_key(session, "web", ["locate"])
    revoked = db.revoke_api_key(session, row.prefix)
    assert revoked.id == row.id and revoked.revoked_at is not None
    assert db.authenticate(session, key) is None
    again = db.revoke_api_key(session, str(row.id))  # revoking twice keeps the first time
    assert again.revoked_at == revoked.revoked_at
    auth_other = db.authenticate(session, other_key)
    assert auth_other is not None and auth_other.id == other.id
    assert [k.name for k in db.list_api_keys(session)] == ["ci", "web"]

    # The plaintext is nowhere in the table: only its hash.
    with engine.connect() as conn:
        dump = " ".join(str(v) for r in conn.execute(text("SELECT * FROM api_keys")) for v in r)
    assert key not in dump and other_key not in dump
    assert key[8:20] not in dump


def test_last_used_at_is_refreshed_at_most_once_a_minute(session: Session) -> None:
    key, row = db.create_api_key(session, "ci", ["locate"])
    first = db.authenticate(session, key)
    assert first is not None and first.last_used_at is not None
    stamp = first.last_used_at
    second = db.authenticate(session, key)
    assert second is not None and second.last_used_at == stamp
    old = datetime.now(UTC) - timedelta(minutes=5)
    session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=old))
    session.commit()
    session.expire_all()
    third = db.authenticate(session, key)
    assert third is not None and third.last_used_at is not None and third.last_used_at > old


def test_api_key_scopes_and_names_are_checked(session: Session) -> None:
    with pytest.raises(InvalidOptionError, match="unknown scope"):
        db.create_api_key(session, "ci", ["locate", "root"])
    with pytest.raises(InvalidOptionError, match="at least one scope"):
        db.create_api_key(session, "ci", [])
    with pytest.raises(InvalidOptionError, match="name"):
        db.create_api_key(session, "  ", ["locate"])
    assert db.list_api_keys(session) == []


def test_revoke_unknown_or_ambiguous_key(session: Session) -> None:
    with pytest.raises(NotFoundError):
        db.revoke_api_key(session, "glk_zzzz")
    with pytest.raises(NotFoundError):
        db.revoke_api_key(session, 12345)
    _, a = db.create_api_key(session, "a", ["locate"])
    _, b = db.create_api_key(session, "b", ["locate"])
    b.prefix = a.prefix  # ~24 random bits: collisions are rare, not impossible
    session.commit()
    with pytest.raises(InvalidOptionError, match="revoke by id"):
        db.revoke_api_key(session, a.prefix)
    assert db.revoke_api_key(session, a.id).id == a.id


def test_revoke_by_full_key(session: Session) -> None:
    key, row = db.create_api_key(session, "a", ["locate"])
    assert db.revoke_api_key(session, key).id == row.id
    assert db.authenticate(session, key) is None


# -- CLI ---------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def cli_env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "data"
    monkeypatch.setenv("GEOLOC_DATA_DIR", str(data))
    monkeypatch.setenv("GEOLOC_DATABASE_URL", db_url)
    return data


def cli(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def error_lines(result: Any) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_cli_db_and_api_keys(cli_env: Path, db_url: str) -> None:
    r = cli("db", "current", "--check")
    assert r.exit_code == 1 and "empty" in r.output

    r = cli("apikey", "create", "ci")  # before the schema exists: one clear line
    assert r.exit_code == 2
    assert len(error_lines(r)) == 1 and "geoloc db upgrade" in error_lines(r)[0]

    r = cli("db", "upgrade")
    assert r.exit_code == 0 and f"-> {db.head_revision()}" in r.output
    assert "already at" in cli("db", "upgrade").output
    assert cli("db", "current", "--check").exit_code == 0

    r = cli("apikey", "create", "ci", "--scope", "locate")
    assert r.exit_code == 0, r.output
    key = r.stdout.strip()
    assert key.startswith("glk_") and "\n" not in key
    assert r.output.count(key) == 1  # printed once; the note on stderr shows the prefix only
    assert "cannot be shown again" in r.stderr

    r = cli("apikey", "list")
    assert r.exit_code == 0 and key[:8] in r.output and key not in r.output
    assert "active" in r.output and "ci" in r.output
    r = cli("apikey", "list", "--json")
    assert r.exit_code == 0 and key not in r.output and '"prefix"' in r.output

    r = cli("apikey", "create", "bad", "--scope", "root")
    assert r.exit_code == 2 and len(error_lines(r)) == 1 and "unknown scope" in r.output

    r = cli("apikey", "revoke", key[:8])
    assert r.exit_code == 0 and "revoked key" in r.output
    assert "revoked" in cli("apikey", "list").output
    engine = db.make_engine(db_url)
    try:
        with db.make_sessionmaker(engine)() as s:
            assert db.authenticate(s, key) is None
    finally:
        engine.dispose()
    r = cli("apikey", "revoke", "glk_nope")
    assert r.exit_code == 2 and len(error_lines(r)) == 1

    r = cli("db", "downgrade", "base")
    assert r.exit_code == 0 and "base" in r.output
    assert cli("db", "current", "--check").exit_code == 1


def test_cli_index_activate(
    cli_env: Path, publish_tiny_index: Callable[..., Manifest], db_url: str
) -> None:
    assert cli("db", "upgrade").exit_code == 0
    r = cli("index", "activate", "tiny", "v9")
    assert r.exit_code == 2
    assert len(error_lines(r)) == 1 and "known versions: none" in r.output

    publish_tiny_index(cli_env, "tiny", "v1")
    publish_tiny_index(cli_env, "tiny", "v2")
    r = cli("index", "activate", "tiny", "v9")
    assert r.exit_code == 2 and len(error_lines(r)) == 1
    assert "['v1', 'v2']" in error_lines(r)[0]

    r = cli("index", "activate", "tiny", "v1")
    assert r.exit_code == 0 and "active: tiny/v1" in r.output
    r = cli("index", "activate", "tiny", "v2")
    assert r.exit_code == 0 and "active: tiny/v2" in r.output
    engine = db.make_engine(db_url)
    try:
        with db.make_sessionmaker(engine)() as s:
            assert active_by_name(s) == {"tiny": ["v2"]}
    finally:
        engine.dispose()


def test_cli_database_unreachable_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEOLOC_DATA_DIR", str(tmp_path))
    # Port 1 on localhost: nothing listens, the connection is refused at once.
    monkeypatch.setenv("GEOLOC_DATABASE_URL", "postgresql://nobody:secret@127.0.0.1:1/none")
    r = cli("apikey", "list")
    assert r.exit_code == 2 and len(error_lines(r)) == 1
    assert "[database-error]" in r.output and "secret" not in r.output


def test_cli_index_build_records_the_version(
    cli_env: Path,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    publish_tiny_index: Callable[..., Manifest],
) -> None:

    # The model and the encoding are not under test here: publish a tiny index instead.
    built: list[Manifest] = []

    def build(settings: Any, name: str, spec: Any, **_: Any) -> Manifest:
        built.append(publish_tiny_index(settings.index_dir, name, f"v{len(built) + 1}"))
        return built[-1]

    monkeypatch.setattr("service.engine.loading.load_geomodel", lambda *a, **k: type("M", (), {})())
    monkeypatch.setattr("service.jobs.indexes.build_index", build)

    r = cli("index", "build", "tiny")  # no schema yet: still succeeds, with a note
    assert r.exit_code == 0, r.output
    assert "published tiny/v1" in r.output and "run `geoloc db upgrade` to record it" in r.output

    assert cli("db", "upgrade").exit_code == 0
    r = cli("index", "build", "tiny")
    assert r.exit_code == 0 and "published tiny/v2" in r.output and "note" not in r.output
    engine = db.make_engine(db_url)
    try:
        with db.make_sessionmaker(engine)() as s:
            labels = [v.label for v in db.list_index_versions(s, "tiny")]
    finally:
        engine.dispose()
    assert labels == ["tiny/v1", "tiny/v2"]  # v1, built before the schema, is synced too


# -- a database that cannot store ---------------------------------------------------------------


def test_a_deleted_sqlite_file_takes_no_more_writes(tmp_path: Path) -> None:
    """A connection keeps writing to the file it opened after that file is deleted: every
    row would be acknowledged and lost. Writes are refused instead, readiness's checks fail,
    and all works again once a database is back at the path."""
    from sqlalchemy.exc import OperationalError, SQLAlchemyError

    url = f"sqlite:///{tmp_path / 'geoloc.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    sessions = db.make_sessionmaker(engine)
    with sessions() as session:
        kept = predict(session, 48.8, 2.3)
    db.check_writable(engine)
    for f in tmp_path.glob("geoloc.db*"):
        f.unlink()
    with sessions() as session, pytest.raises(OperationalError, match="deleted or replaced"):
        predict(session, 51.5, -0.1)
    # The next connection opens what is at the path now: nothing with our schema.
    with sessions() as session, pytest.raises(SQLAlchemyError):
        predict(session, 51.5, -0.1)
    with pytest.raises(db.SchemaNotAtHeadError):  # what readiness reports until it is back
        db.check_at_head(engine)
    db.upgrade(url)  # a database at the path again (restored, or migrated afresh)
    db.check_writable(engine)
    with sessions() as session:
        again = predict(session, 51.5, -0.1)
        assert db.get_prediction(session, again) is not None
        assert db.get_prediction(session, kept) is None  # it went with the deleted file
    engine.dispose()
