"""The HTTP API end to end: the real app, the bundled bluemarble model, SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from api_helpers import IndexData, assert_problem, tile_bytes
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from service.api.main import create_app
from service.config import Settings
from service.db import (
    activate_index,
    create_api_key,
    make_engine,
    make_sessionmaker,
    sync_index_versions,
    upgrade,
)
from tests.net import free_port

pytest_plugins = ["api_fixtures"]  # the bluemarble model, index and app fixtures

REDIS_URL = os.environ.get("GEOLOC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def upload(data: bytes | None = None, name: str = "tile.png") -> dict:
    return {"file": (name, data if data is not None else tile_bytes(), "image/png")}


def check_locate_body(body: dict, locator, top_k: int) -> None:
    assert body["prediction_id"] and len(body["prediction_id"]) == 32
    assert body["profile"] == "bluemarble"
    assert "satellite" in body["purpose"]
    assert body["index_version"] == locator.index_label
    assert 1 <= len(body["candidates"]) <= top_k
    c = body["candidates"][0]
    assert -90 <= c["lat"] <= 90 and -180 <= c["lon"] <= 180 and 0 < c["probability"] <= 1
    assert set(c) >= {"h3", "source", "score", "country_code", "country", "admin1", "city"}
    region_keys = {"share", "covered", "area_km2", "h3_resolution", "cells", "geojson"}
    assert set(body["region"]) == region_keys
    assert body["stages"][0] == "retrieve" and "encode" in body["timings_ms"]
    assert body["warnings"] == []


def test_locate_multipart_and_json_on_both_paths(make_client, bm_locator):
    with make_client() as client:
        r = client.post("/v1/locate", files=upload(), params={"top_k": 3})
        assert r.status_code == 200, r.text
        check_locate_body(r.json(), bm_locator, 3)

        b64 = base64.b64encode(tile_bytes(-25.0, 133.0, "JPEG")).decode()
        r = client.post("/locate", json={"image_base64": b64, "top_k": 2, "refine": False})
        assert r.status_code == 200, r.text
        body = r.json()
        check_locate_body(body, bm_locator, 2)
        assert "refine" not in body["stages"]

        # Query options apply to JSON too; body fields win.
        r = client.post("/v1/locate?top_k=4&diversify=false", json={"image_base64": b64})
        assert len(r.json()["candidates"]) == 4 and "diversify" not in r.json()["stages"]

        r = client.post(
            "/v1/locate",
            files=upload(),
            params={"countries": ["au", "NZ"], "bbox": "-50,100,0,180", "return_neighbours": True},
        )
        assert r.status_code == 200, r.text
        assert {c["country_code"] for c in r.json()["candidates"]} <= {"AU", "NZ", None}
        assert r.json()["neighbours"] == []  # no reference index: asked for, none found


def test_openapi_lists_both_locate_paths_with_problem_responses(make_client):
    with make_client() as client:
        schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/locate", "/locate"):
        op = paths[path]["post"]
        assert set(op["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
        for status in ("413", "415", "422", "503", "504"):
            assert "application/problem+json" in op["responses"][status]["content"]
    assert paths["/v1/locate"]["post"]["operationId"] != paths["/locate"]["post"]["operationId"]
    for path in (
        "/v1/locate/batch",
        "/v1/locate/url",
        "/v1/predictions/{prediction_id}",
        "/v1/predictions/{prediction_id}/feedback",
        "/v1/stats",
        "/v1/info",
        "/v1/admin/index/activate",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths
    assert "Problem" in schema["components"]["schemas"]
    assert "LocateJSONRequest" in schema["components"]["schemas"]


def test_prediction_feedback_and_stats(make_client):
    with make_client() as client:
        located = client.post("/v1/locate", files=upload(tile_bytes(30.8, 31.0))).json()
        pid = located["prediction_id"]
        top = located["candidates"][0]

        r = client.get(f"/v1/predictions/{pid}")
        assert r.status_code == 200
        assert r.json()["result"]["candidates"][0]["lat"] == top["lat"]
        assert r.json()["index_version"] == located["index_version"]

        # Feedback 1 degree of latitude (~111 km) north of the top candidate.
        truth = {"lat": top["lat"] + 1 if top["lat"] < 89 else top["lat"] - 1, "lon": top["lon"]}
        r = client.post(f"/v1/predictions/{pid}/feedback", json=truth)
        assert r.status_code == 200, r.text
        assert r.json()["error_km"] == pytest.approx(111.2, abs=1.0)

        stats = client.get("/v1/stats").json()
        assert stats["predictions"] == 1 and stats["with_feedback"] == 1
        assert stats["median_km"] == pytest.approx(111.2, abs=1.0)
        assert stats["within_km"]["200"] == 1.0 and stats["within_km"]["25"] == 0.0
        counts = {(c["route"], c["status"]): c["count"] for c in stats["requests"]}
        assert counts[("/v1/locate", "200")] == 1
        assert counts[("/v1/predictions/{prediction_id}/feedback", "200")] == 1

        later = client.get("/v1/stats", params={"since": "2999-01-01T00:00:00Z"}).json()
        assert later["predictions"] == 0

        assert_problem(client.get(f"/v1/predictions/{uuid.uuid4().hex}"), 404, "not-found")
        assert_problem(
            client.post(f"/v1/predictions/{uuid.uuid4().hex}/feedback", json=truth),
            404,
            "not-found",
        )
        r = client.get("/v1/stats", params={"since": "yesterday"})
        assert_problem(r, 422, "invalid-option")


def test_batch_with_one_bad_item(make_client):
    files = [
        ("files", ("a.png", tile_bytes(23.0, 12.0), "image/png")),
        ("files", ("bad.jpg", b"this is not an image", "image/jpeg")),
        ("files", ("c.jpg", tile_bytes(72.0, -40.0, "JPEG"), "image/jpeg")),
    ]
    with make_client(max_batch=3) as client:
        r = client.post("/v1/locate/batch", files=files, params={"top_k": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["succeeded"], body["failed"]) == (2, 1)
        items = body["items"]
        assert [i["index"] for i in items] == [0, 1, 2]
        assert items[0]["result"]["prediction_id"] and items[2]["result"]["prediction_id"]
        assert len(items[0]["result"]["candidates"]) <= 2
        assert items[1]["result"] is None and items[1]["filename"] == "bad.jpg"
        assert items[1]["problem"]["type"].endswith("/unsupported-media-type")
        assert items[1]["problem"]["status"] == 415

        too_many = [*files, ("files", ("d.png", tile_bytes(), "image/png"))]
        assert_problem(client.post("/v1/locate/batch", files=too_many), 422, "too-many-images")
        assert_problem(client.post("/v1/locate/batch", json={}), 415, "unsupported-content-type")
        assert_problem(
            client.post("/v1/locate/batch", files={"file": ("a.png", tile_bytes(), "image/png")}),
            422,
            "missing-image",
        )


def test_info_health_ready_and_metrics(make_client, bm_locator):
    with make_client() as client:
        info = client.get("/v1/info").json()
        assert info["profile"]["name"] == "bluemarble"
        assert "satellite" in info["profile"]["purpose"]
        assert info["profile"]["embedding_dim"] == bm_locator.model.embed_dim
        assert info["index"]["version"] == bm_locator.index.manifest.version
        assert info["index"]["gallery_kind"] == "h3" and info["index"]["h3_resolution"] == 2
        assert info["index"]["count"] == len(bm_locator.index)
        # An exact index: no lists to probe, nothing to re-rank.
        assert info["index"]["nprobe"] is None and info["index"]["rerank_k"] == 0
        assert info["reference_index"] is None
        assert info["limits"]["max_batch"] > 0 and not info["auth_enabled"]

        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {
            "model": "ok",
            "index": "ok",
            "database": "ok",
            "shutdown": "ok",
        }

        client.post("/v1/locate", files=upload())
        client.post("/v1/locate", files=upload(b"nope"))
        text = client.get("/metrics").text
    assert 'geoloc_http_requests_total{method="POST",route="/v1/locate",status="200"} 1.0' in text
    assert 'geoloc_problems_total{type="unsupported-media-type"} 1.0' in text
    assert 'geoloc_stage_duration_seconds_count{stage="encode"} 1.0' in text
    assert 'geoloc_stage_duration_seconds_count{stage="refine"} 1.0' in text
    assert "geoloc_batch_size_count 1.0" in text
    assert "geoloc_queue_depth 0.0" in text
    assert f'geoloc_index_info{{index="{bm_locator.index_label}"}} 1.0' in text
    verdicts = [x for x in text.splitlines() if x.startswith("geoloc_verdicts_total{")]
    assert sum(float(x.split()[-1]) for x in verdicts) == 1.0, verdicts  # one image located
    assert "process_resident_memory_bytes " in text  # one process: its own memory


def test_schema_not_at_head_degrades_but_still_locates(make_client):
    with make_client(migrate=False) as client:
        r = client.get("/readyz")
        body = assert_problem(r, 503, "not-ready")
        assert body["checks"]["model"] == "ok" and body["checks"]["index"] == "ok"
        assert "geoloc db upgrade" in body["checks"]["database"]

        r = client.post("/v1/locate", files=upload())
        assert r.status_code == 200
        assert r.json()["prediction_id"] is None and "not recorded" in r.json()["warnings"][0]

        assert_problem(
            client.post(f"/v1/predictions/{uuid.uuid4().hex}/feedback", json={"lat": 1, "lon": 2}),
            503,
            "database-unavailable",
        )
        assert_problem(client.get("/v1/stats"), 503, "database-unavailable")
        assert client.get("/healthz").status_code == 200


def test_readyz_when_the_index_cannot_load(db_url, tmp_path):
    upgrade(db_url)
    settings = Settings(data_dir=tmp_path / "empty", database_url=db_url, index_poll_s=0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        body = assert_problem(client.get("/readyz"), 503, "not-ready")
        assert body["checks"]["database"] == "ok"
        assert body["checks"]["index"] != "ok"
        assert_problem(client.post("/v1/locate", files=upload()), 503, "not-ready")
        assert_problem(client.get("/v1/info"), 503, "not-ready")


def _keys(db_url: str) -> dict[str, str]:
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as s:
            return {
                "locate": create_api_key(s, "app", ["locate"])[0],
                "admin": create_api_key(s, "ops", ["admin"])[0],
            }
    finally:
        engine.dispose()


def test_auth_on_and_off(make_client, db_url, bm_index: IndexData):
    with make_client() as client:  # auth off: open, except admin endpoints
        assert client.post("/v1/locate", files=upload()).status_code == 200
        assert_problem(
            client.post("/v1/admin/index/activate", json={"name": "x", "version": "y"}),
            403,
            "forbidden",
        )
    upgrade(db_url)
    keys = _keys(db_url)
    # A long poll interval: the activation itself must make this replica look at once.
    with make_client(auth_enabled=True, index_poll_s=60) as client:
        r = client.post("/v1/locate", files=upload())
        assert_problem(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = client.post("/v1/locate", files=upload(), headers={"Authorization": "Bearer glk_nope"})
        assert_problem(r, 401, "unauthorized")
        assert "invalid_token" in r.headers["www-authenticate"]
        admin = {"Authorization": f"Bearer {keys['admin']}"}
        assert_problem(client.post("/v1/locate", files=upload(), headers=admin), 403, "forbidden")
        assert_problem(client.get("/v1/stats", headers=admin), 403, "forbidden")

        bearer = {"Authorization": f"Bearer {keys['locate']}"}
        r = client.post("/v1/locate", files=upload(), headers=bearer)
        assert r.status_code == 200, r.text
        pid = r.json()["prediction_id"]
        r = client.get(f"/v1/predictions/{pid}", headers={"X-API-Key": keys["locate"]})
        assert r.status_code == 200
        assert client.get("/v1/stats", headers=bearer).status_code == 200
        assert client.get("/healthz").status_code == 200  # never needs a key
        assert client.get("/v1/info").status_code == 200

        body = {"name": "default-bluemarble", "version": bm_index.versions[1]}
        assert_problem(client.post("/v1/admin/index/activate", json=body), 401, "unauthorized")
        r = client.post("/v1/admin/index/activate", json=body, headers=bearer)
        assert_problem(r, 403, "forbidden")
        r = client.post("/v1/admin/index/activate", json=body, headers=admin)
        assert r.status_code == 200, r.text
        assert r.json()["active"] and r.json()["version"] == bm_index.versions[1]
        deadline = time.monotonic() + 10
        while not client.get("/readyz").json()["index_version"].endswith(bm_index.versions[1]):
            assert time.monotonic() < deadline, "the activated version was not swapped in"
            time.sleep(0.05)
        missing = {"name": "default-bluemarble", "version": "19990101-000000-000000"}
        r = client.post("/v1/admin/index/activate", json=missing, headers=admin)
        assert_problem(r, 404, "not-found")

        schema = client.get("/openapi.json").json()
        assert "bearer" in schema["components"]["securitySchemes"]
        assert schema["paths"]["/v1/locate"]["post"]["security"]


def _activate(db_url: str, data_dir: Path, version: str) -> None:
    engine = make_engine(db_url)
    try:
        for attempt in range(10):
            try:
                with make_sessionmaker(engine)() as s:
                    sync_index_versions(s, data_dir)
                    activate_index(s, "default-bluemarble", version)
                return
            except OperationalError as exc:
                # SQLite: db.activate_index reads, then writes in a deferred transaction, which
                # fails at once ("database is locked") while the app is writing predictions.
                if "locked" not in str(exc) or attempt == 9:
                    raise
                time.sleep(0.1)
    finally:
        engine.dispose()


@pytest.mark.timeout(180)
def test_index_swap_while_requests_run(make_client, db_url, bm_index: IndexData, bm_locator):
    v1, v2 = bm_index.versions
    upgrade(db_url)
    _activate(db_url, bm_index.data_dir, v1)
    png = tile_bytes(29.5, 84.0)
    seen: list[tuple[int, str]] = []
    stop = threading.Event()
    with make_client(index_poll_s=0.05) as client:

        def hammer() -> None:
            for _ in range(500):  # bounded, whatever happens to `stop`
                if stop.is_set():
                    return
                r = client.post("/v1/locate", files=upload(png))
                version = r.json().get("index_version") if r.status_code == 200 else r.text
                seen.append((r.status_code, str(version)))

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(hammer) for _ in range(4)]
            try:
                time.sleep(0.5)
                _activate(db_url, bm_index.data_dir, v2)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    if seen and seen[-1][1].endswith(v2) and len(seen) > 20:
                        break
                    time.sleep(0.05)
                time.sleep(0.3)
            finally:
                stop.set()
        for f in futures:
            f.result()  # a hammer that raised fails the test here
        after = client.get("/readyz").json()["index_version"]
        metrics = client.get("/metrics").text
    statuses = {s for s, _ in seen}
    versions = [v for _, v in seen]
    assert statuses == {200}, seen[:5]
    assert set(versions) <= {f"default-bluemarble/{v1}", f"default-bluemarble/{v2}"}
    assert versions[0].endswith(v1) and versions[-1].endswith(v2), versions
    assert after == f"default-bluemarble/{v2}"
    assert "geoloc_index_swaps_total 1.0" in metrics
    assert bm_locator.index.manifest.version == v1  # the injected locator was not changed


def test_a_broken_version_is_not_swapped_in(
    make_client, db_url, bm_index: IndexData, tmp_path, caplog
):
    data = tmp_path / "data"
    shutil.copytree(bm_index.data_dir / "indexes", data / "indexes")
    v1, v2 = bm_index.versions
    upgrade(db_url)
    _activate(db_url, data, v1)
    # Corrupt v2 after registering it: the checksum no longer matches.
    (data / "indexes" / "default-bluemarble" / v2 / "latlon.npy").write_bytes(b"garbage")
    with make_client(data_dir=data, index_poll_s=0.05) as client:
        _activate(db_url, data, v2)
        time.sleep(0.6)
        r = client.post("/v1/locate", files=upload())
        assert r.status_code == 200 and r.json()["index_version"].endswith(v1)
        assert client.get("/readyz").json()["index_version"].endswith(v1)
    assert f"cannot load index default-bluemarble/{v2}" in caplog.text
    assert "checksum mismatch" in caplog.text


def test_rate_limit_in_process(make_client):
    with make_client(rate_limit_per_minute=2) as client:
        assert client.post("/v1/locate", files=upload()).status_code == 200
        assert client.get("/v1/stats").status_code == 200
        r = client.post("/v1/locate", files=upload())
        body = assert_problem(r, 429, "rate-limited")
        assert int(r.headers["retry-after"]) >= 1 and "2 requests per minute" in body["detail"]
        assert client.get("/healthz").status_code == 200  # not limited
        assert client.get("/metrics").status_code == 200


def _redis_or_skip() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis unreachable at {REDIS_URL}: {exc}")


def test_rate_limit_shared_through_redis(make_client):
    _redis_or_skip()
    # A fixed window per minute: do not start right before the minute turns.
    if time.time() % 60 > 55:
        time.sleep(60 - time.time() % 60 + 0.1)
    prefix = f"geoloc-test-{uuid.uuid4().hex}"
    opts = {"rate_limit_per_minute": 3, "redis_url": REDIS_URL, "redis_prefix": prefix}
    with make_client(**opts) as replica_a, make_client(migrate=False, **opts) as replica_b:
        assert replica_a.get("/v1/stats").status_code == 200
        assert replica_b.get("/v1/stats").status_code == 200
        assert replica_a.get("/v1/stats").status_code == 200
        r = replica_b.get("/v1/stats")  # the 4th request in this minute, across both replicas
        assert_problem(r, 429, "rate-limited")
        assert 1 <= int(r.headers["retry-after"]) <= 60
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*"))
    assert keys and all(0 < client.ttl(k) <= 120 for k in keys)
    client.delete(*keys)


def test_redis_down_falls_back_to_in_process_limits(make_client):
    opts = {"rate_limit_per_minute": 1, "redis_url": "redis://127.0.0.1:1/0"}
    with make_client(**opts) as client:
        assert client.get("/v1/stats").status_code == 200
        assert_problem(client.get("/v1/stats"), 429, "rate-limited")


def test_serve_with_workers_runs_the_supervisor_on_one_bound_socket(monkeypatch):
    from typer.testing import CliRunner

    from service.api import server
    from service.cli import main as cli

    calls: dict = {}

    def run(self: server.Supervisor) -> None:
        calls.update(n=self.n, where=self.where, bound=self.sock.getsockname())
        self.sock.close()

    monkeypatch.setattr(server.Supervisor, "run", run)
    port = free_port()
    monkeypatch.setenv("GEOLOC_PORT", str(port))
    result = CliRunner().invoke(cli.app, ["serve", "--workers", "2", "--no-migrate"])
    assert result.exit_code == 0, result.output
    assert calls == {"n": 2, "where": ("127.0.0.1", port, "info"), "bound": ("127.0.0.1", port)}
