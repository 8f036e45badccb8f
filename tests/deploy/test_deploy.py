"""The deployment, with real processes on loopback: nginx (Debian's, with deploy/nginx.conf),
three `geoloc serve` replicas on one PostgreSQL database, Redis and one index directory.

Tests run in file order on one cluster: the later ones stop replicas. Each load is bounded in
requests and seconds. Figures (requests, failures) are printed (-s shows them).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, multiprocess
from sqlalchemy import select

from index.store import list_indexes, load_index
from service.api.problems import PROBLEM_MEDIA_TYPE as PROBLEM
from service.config import Settings
from service.db import (
    IndexBuildLockedError,
    activate_index,
    index_build_lock,
    list_index_versions,
    make_engine,
    make_sessionmaker,
    wait_for_database,
)
from service.db.models import Prediction
from service.errors import DatabaseUnavailableError
from tests.deploy.cluster import ROOT, Load, PrivatePostgres, Replica, running, wait_until
from tests.deploy.conftest import INDEX, Cluster
from tests.net import free_port

pytestmark = pytest.mark.timeout(300)


def served_version(replica: Replica) -> str | None:
    r = httpx.get(f"{replica.url}/readyz", timeout=5)
    return r.json().get("index_version") if r.status_code == 200 else None


def activate(c: Cluster, version: str) -> dict[str, object]:
    return c.zygote.run("index", "activate", INDEX, version)


def published(output: str) -> str:
    return output.split(f"published {INDEX}/")[1].split(":")[0]


def test_shipped_nginx_config_is_the_one_running(cluster: Cluster) -> None:
    text = (cluster.nginx.prefix / "geoloc.conf").read_text()
    directives = [line.split("#")[0].strip() for line in text.splitlines()]
    limit = Settings().max_request_bytes
    assert f"client_max_body_size {limit};" in directives
    assert [d for d in directives if d.startswith("proxy_next_upstream ")] == [
        "proxy_next_upstream error timeout;"  # never non_idempotent: a POST is not resent
    ]
    servers = [d for d in directives if d.startswith("server 127.0.0.1:")]
    assert servers == [
        f"server 127.0.0.1:{r.port} max_fails=1 fail_timeout=5s;" for r in cluster.replicas
    ]
    # A body over the service's limit stops at nginx, as the API's problem+json.
    with socket.create_connection(("127.0.0.1", cluster.nginx.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/locate HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            + f"Content-Length: {limit + 1}\r\n\r\n".encode()
        )
        head = s.recv(65536).decode()
    assert head.startswith("HTTP/1.1 413") and PROBLEM in head and "request-too-large" in head


def test_requests_spread_over_replicas_and_all_succeed(cluster: Cluster) -> None:
    load = Load(f"{cluster.nginx.url}/v1/locate", cluster.tile, concurrency=6, max_requests=60)
    outcomes = load.run()
    per_replica = Counter(o.replica for o in outcomes)
    print(f"\n60 requests through nginx: {dict(per_replica)}")
    assert len(outcomes) == 60 and not load.failures(), load.failures()[:3]
    assert set(per_replica) == {"r0", "r1", "r2"}, per_replica
    assert {o.index_version for o in outcomes} == {f"{INDEX}/{cluster.versions[0]}"}
    # The container's HEALTHCHECK script, against a live replica and a closed port.
    script = [sys.executable, str(ROOT / "deploy" / "healthcheck.py")]
    for port, expected in ((cluster.replicas[0].port, 0), (cluster.nginx.port + 1, 1)):
        env = {"GEOLOC_PORT": str(port), "PATH": "/usr/bin:/bin"}
        assert subprocess.run(script, env=env, capture_output=True, timeout=10).returncode == (
            expected
        )


def test_index_activation_under_load_and_corrupt_index_refused(cluster: Cluster) -> None:
    v1 = cluster.versions[0]
    load = Load(f"{cluster.nginx.url}/v1/locate", cluster.tile, concurrency=4, max_requests=600)
    with running(load):
        load.wait_for(10)
        built = cluster.zygote.run("index", "build", INDEX, "--res", "1")  # while serving
        assert built["status"] == 0, built["output"]
        v2 = published(str(built["output"]))
        done = activate(cluster, v2)
        assert done["status"] == 0, done["output"]
        wait_until(
            lambda: all(served_version(r) == f"{INDEX}/{v2}" for r in cluster.replicas),
            30,
            "every replica serving the new version",
        )
        swapped = time.monotonic()
        n_swap = load.count()
        load.wait_for(n_swap + 20)
    outcomes = load.outcomes
    after = [o for o in outcomes if o.started > swapped]
    versions = Counter(o.index_version for o in outcomes)
    print(f"\nactivation under load: {len(outcomes)} requests, versions {dict(versions)}")
    assert not load.failures(), load.failures()[:3]
    assert set(versions) == {f"{INDEX}/{v1}", f"{INDEX}/{v2}"}
    assert after and all(o.index_version == f"{INDEX}/{v2}" for o in after)
    cluster.versions.append(v2)

    # A corrupt version: the CLI refuses to activate it; forced active anyway (as if the file
    # rotted on the shared volume after activation), every replica refuses it and keeps v2.
    built = cluster.zygote.run("index", "build", INDEX, "--res", "1")
    v3 = published(str(built["output"]))
    latlon = cluster.data_dir / "indexes" / INDEX / v3 / "latlon.npy"
    raw = bytearray(latlon.read_bytes())
    raw[-1] ^= 0xFF
    latlon.write_bytes(bytes(raw))
    refused = activate(cluster, v3)
    assert refused["status"] == 2 and "checksum mismatch" in str(refused["output"]), refused
    engine = make_engine(cluster.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            activate_index(session, INDEX, v3)
        load = Load(f"{cluster.nginx.url}/v1/locate", cluster.tile, concurrency=4, max_requests=40)
        with running(load):
            wait_until(
                lambda: all(
                    "checksum mismatch" in r.log.read_text() and v3 in r.log.read_text()
                    for r in cluster.replicas
                ),
                30,
                "every replica refusing the corrupt version",
            )
        assert len(load.outcomes) > 0 and not load.failures(), load.failures()[:3]
        assert {o.index_version for o in load.outcomes} == {f"{INDEX}/{v2}"}
        assert all(served_version(r) == f"{INDEX}/{v2}" for r in cluster.replicas)
        with make_sessionmaker(engine)() as session:
            activate_index(session, INDEX, v2)
    finally:
        engine.dispose()


def test_sigterm_under_load_fails_no_request(cluster: Cluster) -> None:
    """r2 drains for GEOLOC_SHUTDOWN_DRAIN_S=1.5: /readyz 503 at once, still serving, then the
    listener closes and requests in flight (a slow batch sent to it directly) complete."""
    r2 = cluster.replicas[2]
    load = Load(f"{cluster.nginx.url}/v1/locate", cluster.tile, concurrency=4, max_requests=300)
    batch: dict[str, httpx.Response] = {}

    def slow_batch() -> None:
        files = [("files", (f"t{i}.jpg", cluster.tile, "image/jpeg")) for i in range(24)]
        batch["r"] = httpx.post(f"{r2.url}/v1/locate/batch", files=files, timeout=60)

    with running(load):
        load.wait_for(20)
        r2.signal(signal.SIGTERM)
        t0 = time.monotonic()
        ready = httpx.get(f"{r2.url}/readyz", timeout=5)
        health = httpx.get(f"{r2.url}/healthz", timeout=5)
        sender = threading.Thread(target=slow_batch)
        sender.start()
        assert ready.status_code == 503 and ready.headers["content-type"] == PROBLEM
        assert ready.json()["checks"]["shutdown"].startswith("draining"), ready.json()
        assert health.status_code == 200
        assert r2.proc is not None
        code = r2.proc.wait(timeout=40)
        exited = time.monotonic() - t0
        sender.join(timeout=60)
        n_gone = load.count()
        load.wait_for(n_gone + 30)
    served_by_r2 = sum(o.replica == "r2" for o in load.outcomes)
    print(
        f"\nSIGTERM under load: {len(load.outcomes)} requests, {len(load.failures())} failed, "
        f"{served_by_r2} served by r2, exit {code} after {exited:.1f} s"
    )
    assert code in (0, -signal.SIGTERM)
    assert batch["r"].status_code == 200 and batch["r"].json()["succeeded"] == 24
    assert not load.failures(), load.failures()[:3]
    assert served_by_r2 > 0
    assert all(o.replica != "r2" for o in load.outcomes[n_gone:])


def _workers(proc: subprocess.Popen[bytes]) -> set[int]:
    """The pids of a supervisor's worker processes (its children that run the server)."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    workers = set()
    for pid in map(int, out.split()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"resource_tracker" not in cmdline:
            workers.add(pid)
    return workers


def _locates(url: str) -> float:
    """Successful POST /v1/locate requests in one scrape of /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("geoloc_http_requests_total{")
        and 'route="/v1/locate"' in line
        and 'status="200"' in line
    )


def _worker_locates(metrics_dir: Path, pid: int, tmp: Path) -> float:
    """Successful locates counted by one worker: its own files, read by prometheus_client's
    collector in a directory of their own."""
    own = tmp / f"only-{pid}"
    shutil.rmtree(own, ignore_errors=True)
    own.mkdir()
    for f in metrics_dir.glob(f"*_{pid}.db"):
        shutil.copy(f, own / f.name)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(own))
    return sum(
        s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "geoloc_http_requests_total"
        and s.labels.get("route") == "/v1/locate"
        and s.labels.get("status") == "200"
    )


def test_two_workers_replace_a_dead_one_and_drain_as_one_replica(
    cluster: Cluster, tmp_path: Path
) -> None:
    """GEOLOC_WORKERS=2: a worker killed with SIGKILL is replaced; one scrape of /metrics counts
    the requests of both workers; on SIGTERM every worker turns
    /readyz 503 at once and keeps serving through the drain, a slow batch in flight completes,
    and the replica exits cleanly with no worker left behind."""
    env = {**cluster.replicas[0].env, "GEOLOC_WORKERS": "2", "GEOLOC_SHUTDOWN_DRAIN_S": "1.5"}
    env["GEOLOC_INDEX_VERSION"] = cluster.versions[0]
    metrics_dir = tmp_path / "metrics"  # an operator's PROMETHEUS_MULTIPROC_DIR
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    r = Replica("r-w2", free_port(), env, tmp_path / "r-w2.log")
    r.start()
    try:
        r.wait_ready()
        assert r.proc is not None
        first = _workers(r.proc)
        assert len(first) == 2, first
        victim = min(first)
        subprocess.run(["kill", "-KILL", str(victim)], check=True)
        wait_until(lambda: len(_workers(r.proc) - {victim}) == 2, 120, "a new worker")  # type: ignore[arg-type]
        r.wait_ready()
        for _ in range(8):  # both workers share the socket; all answer
            assert httpx.get(f"{r.url}/readyz", timeout=5).status_code == 200
        workers = _workers(r.proc)
        # Metrics add up across workers: once both workers have served some requests (the new
        # one answers when its model is loaded), one scrape counts all of them.
        tile = {"file": ("t.jpg", cluster.tile, "image/jpeg")}

        def locate(_: int) -> int:
            return httpx.post(f"{r.url}/v1/locate", files=tile, timeout=30).status_code

        sent = 0
        deadline = time.monotonic() + 120
        with ThreadPoolExecutor(6) as pool:  # concurrent connections: both workers take some
            while not all(_worker_locates(metrics_dir, w, tmp_path) for w in workers):
                assert time.monotonic() < deadline, "one worker never served"
                assert list(pool.map(locate, range(6))) == [200] * 6
                sent += 6
        per_worker = [_worker_locates(metrics_dir, w, tmp_path) for w in workers]
        assert sum(per_worker) == sent and _locates(r.url) == sent, (per_worker, sent)
        stats = httpx.get(f"{r.url}/v1/stats", timeout=10).json()
        assert sum(x["count"] for x in stats["requests"] if x["route"] == "/v1/locate") == sent

        batch: dict[str, httpx.Response] = {}

        def slow_batch() -> None:
            files = [("files", (f"t{i}.jpg", cluster.tile, "image/jpeg")) for i in range(24)]
            batch["r"] = httpx.post(f"{r.url}/v1/locate/batch", files=files, timeout=60)

        sender = threading.Thread(target=slow_batch)
        sender.start()
        time.sleep(0.2)
        r.signal(signal.SIGTERM)
        time.sleep(0.2)
        t0 = time.monotonic()
        readiness = [httpx.get(f"{r.url}/readyz", timeout=5) for _ in range(6)]
        during = httpx.post(f"{r.url}/v1/locate", files=tile, timeout=30)
        assert time.monotonic() - t0 < 1.3, "the drain ended before the checks"
        assert all(x.status_code == 503 for x in readiness), [x.status_code for x in readiness]
        assert all(x.json()["checks"]["shutdown"].startswith("draining") for x in readiness), (
            readiness[0].text
        )
        assert during.status_code == 200, during.text
        code = r.proc.wait(timeout=60)
        sender.join(timeout=60)
    finally:
        r.stop()
    assert code == 0, r.log.read_text()[-3000:]
    assert batch["r"].status_code == 200 and batch["r"].json()["succeeded"] == 24
    assert not any(Path(f"/proc/{p}").exists() for p in workers), "a worker outlived the replica"


def test_kill9_routed_around_with_bounded_failures(cluster: Cluster) -> None:
    r1 = cluster.replicas[1]
    concurrency = 4
    load = Load(
        f"{cluster.nginx.url}/v1/locate", cluster.tile, concurrency=concurrency, max_requests=400
    )
    with running(load):
        load.wait_for(20)
        r1.signal(signal.SIGKILL)
        assert r1.proc is not None
        r1.proc.wait(timeout=10)  # gone, its sockets closed: later connections are refused
        killed = time.monotonic()
        n_kill = load.count()
        load.wait_for(n_kill + 40)
        # However fast the replicas answer, go on until requests started well after the kill.
        time.sleep(max(0.0, killed + 1.0 - time.monotonic()))
        load.wait_for(load.count() + 20)
    failures = load.failures()
    print(
        f"\nkill -9 under load: {len(load.outcomes)} requests, {len(failures)} failed "
        f"(statuses {Counter(o.status for o in failures)}); in flight at most {concurrency}"
    )
    for o in failures:
        print(f"  {o.status} after {o.seconds:.3f} s: {o.error}")
    # Only requests already sent to r1 before it was gone can fail (nginx never resends a
    # POST it wrote); a connection refused afterwards is retried on another replica.
    assert len(failures) <= concurrency
    assert all(o.started < killed for o in failures), failures
    # A request r1 had not answered gets nginx's 502. One r1 was answering when it died may
    # arrive cut short instead: nginx passes a response's head on as soon as it has it, and
    # cannot take it back when the body never comes.
    assert all(
        (o.status == 502 and o.content_type == PROBLEM)
        or (o.status == 0 and "complete message body" in (o.error or ""))
        for o in failures
    ), failures
    late = [o for o in load.outcomes if o.started > killed + 0.5]
    assert late and all(o.status == 200 and o.replica != "r1" for o in late)


def test_index_build_lock_and_builds_killed_at_random(cluster: Cluster, tmp_path: Path) -> None:
    name = "killtest"
    csv = tmp_path / "points.csv"
    gen = np.random.default_rng(11)
    # Big enough that writing the files takes a while (about 10 MB), for kills to land in it.
    points = np.column_stack([gen.uniform(-60, 70, 5000), gen.uniform(-180, 180, 5000)])
    csv.write_text("lat,lon\n" + "".join(f"{a:.5f},{b:.5f}\n" for a, b in points))
    build = ("index", "build", name, "--gallery", "csv", "--csv", str(csv))
    root = cluster.data_dir

    # Lock held elsewhere: the build refuses at once, publishes nothing.
    with index_build_lock(cluster.database_url, name):
        with pytest.raises(IndexBuildLockedError), index_build_lock(cluster.database_url, name):
            pass
        busy = cluster.zygote.run(*build)
    assert busy["status"] == 2 and "index-build-in-progress" in str(busy["output"]), busy
    assert list_indexes(root, name) == []

    # Two full builds, each watched for its temporary directory: the faster one sets the
    # range of the kills, which are aimed by the build's own progress, not by the clock alone.
    temporary = str(root / "indexes" / name / ".tmp-*")
    full = [cluster.zygote.run(*build, counted_from=temporary) for _ in range(2)]
    for reply in full:
        assert reply["status"] == 0 and reply["anchored_after"] is not None, reply["output"]
    seconds = min(float(r["seconds"]) for r in full)
    writing = min(float(r["seconds"]) - float(r["anchored_after"]) for r in full)
    outcomes: Counter[str] = Counter()
    trials: list[str] = []
    engine = make_engine(cluster.database_url)
    try:
        for trial in range(12):
            before = {m.version for m in list_indexes(root, name)}
            if trial % 2:  # anywhere in the build, counted from the fork
                delay = float(gen.uniform(0.05, 0.8 * seconds))
                reply = cluster.zygote.run(*build, kill_after=delay)
            else:  # while the files are written, counted from the temporary directory
                delay = float(gen.uniform(0.0, 0.8 * writing))
                reply = cluster.zygote.run(*build, kill_after=delay, counted_from=temporary)
            killed = reply["status"] == -signal.SIGKILL  # it may have finished just before
            after = list_indexes(root, name)
            leftovers = list((root / "indexes" / name).glob(".tmp-*"))
            new = {m.version for m in after} - before
            trials.append(f"{delay:.2f}s:{reply['status']}:{len(new)}{len(leftovers)}")
            outcomes[
                "finished" if not killed else
                "killed, version published" if new else
                "killed mid-write (temporary dir left)" if leftovers else
                "killed before writing"
            ] += 1  # fmt: skip
            # Whatever is visible is complete: every version loads with good checksums ...
            for m in after:
                load_index(root, name, m.version, verify=True)
            # ... and only complete versions are known to the database or can be activated.
            with make_sessionmaker(engine)() as session:
                rows = {r.version for r in list_index_versions(session, name)}
            assert rows <= {m.version for m in after}
            for tmp in leftovers:
                refused = cluster.zygote.run("index", "activate", name, tmp.name)
                assert refused["status"] == 2, refused
    finally:
        engine.dispose()
    print(
        f"\n12 builds killed at random (full build {seconds:.2f} s, the last {writing:.2f} s "
        f"from the temporary directory on): {dict(outcomes)}\n"
        f"  delay:status:new,leftovers {trials}"
    )
    assert sum(n for k, n in outcomes.items() if k != "finished") >= 6, outcomes
    rerun = cluster.zygote.run(*build)
    assert rerun["status"] == 0, rerun["output"]
    assert not list((root / "indexes" / name).glob(".tmp-*")), "leftovers not cleared"


def test_postgres_outage(
    cluster: Cluster, outage_replica: Replica, private_pg: PrivatePostgres
) -> None:
    """Locate keeps answering while the database is down; its predictions are not recorded
    (prediction_id null, a warning), readiness fails, and all recovers on its own."""
    url = outage_replica.url
    tile = {"file": ("t.jpg", cluster.tile, "image/jpeg")}
    stored = []
    for _ in range(5):
        r = httpx.post(f"{url}/v1/locate", files=tile, timeout=30)
        assert r.status_code == 200 and r.json()["prediction_id"], r.text
        stored.append(r.json()["prediction_id"])

    private_pg.stop()
    try:
        wait_until(
            lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 503, 15, "not ready"
        )
        ready = httpx.get(f"{url}/readyz", timeout=5)
        assert ready.headers["content-type"] == PROBLEM
        assert ready.json()["checks"]["database"] != "ok"
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        for _ in range(3):
            r = httpx.post(f"{url}/v1/locate", files=tile, timeout=30)
            assert r.status_code == 200 and r.json()["prediction_id"] is None, r.text
            assert "not recorded" in r.json()["warnings"][0]
        r = httpx.get(f"{url}/v1/predictions/{stored[0]}", timeout=10)
        assert r.status_code == 503 and r.headers["content-type"] == PROBLEM
        with pytest.raises(DatabaseUnavailableError, match="did not accept a connection"):
            wait_for_database(private_pg.url, 0.5)
        threading.Timer(1.0, private_pg.start).start()  # back while start-up waits for it
        wait_for_database(private_pg.url, 30)
    finally:
        isready = ["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(private_pg.port)]
        if subprocess.run(isready, timeout=10).returncode:
            private_pg.start()
    wait_until(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, 20, "ready again")
    for pid in stored:
        assert httpx.get(f"{url}/v1/predictions/{pid}", timeout=10).status_code == 200
    r = httpx.post(f"{url}/v1/locate", files=tile, timeout=30)
    assert r.status_code == 200 and r.json()["prediction_id"]
    engine = make_engine(private_pg.url)
    try:
        with make_sessionmaker(engine)() as session:
            ids = set(session.scalars(select(Prediction.id)))
    finally:
        engine.dispose()
    assert set(stored) | {r.json()["prediction_id"]} <= ids and len(ids) == len(stored) + 1


def _set_read_only(pg: PrivatePostgres, on: bool) -> None:
    """Make every new transaction on the private server read-only (or not), as a primary
    turned standby or a full disk's emergency setting would; live sessions take it at once."""
    import psycopg

    with psycopg.connect(pg.url.replace("+psycopg", ""), autocommit=True) as conn:
        value = "on" if on else "off"
        conn.execute(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
        conn.execute("SELECT pg_reload_conf()")


def _write_failures(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    lines = [x for x in text.splitlines() if x.startswith("geoloc_prediction_write_failures_total")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_postgres_read_only_makes_the_replica_not_ready_and_acknowledges_nothing(
    cluster: Cluster, outage_replica: Replica, private_pg: PrivatePostgres
) -> None:
    """A server that takes no writes (it answers reads): /readyz turns 503 within a poll,
    answers carry no prediction id, feedback is refused, nothing is stored, and all recovers
    by itself when writes are allowed again."""
    url = outage_replica.url
    tile = {"file": ("t.jpg", cluster.tile, "image/jpeg")}
    r = httpx.post(f"{url}/v1/locate", files=tile, timeout=30)
    assert r.status_code == 200 and r.json()["prediction_id"], r.text
    stored = r.json()["prediction_id"]
    engine = make_engine(private_pg.url)
    try:
        with make_sessionmaker(engine)() as session:
            before = set(session.scalars(select(Prediction.id)))
        failures = _write_failures(url)
        _set_read_only(private_pg, True)
        try:
            # one poll interval (GEOLOC_INDEX_POLL_S=0.5) and a margin
            wait_until(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 503, 3, "503")
            ready = httpx.get(f"{url}/readyz", timeout=5)
            assert "read-only" in ready.json()["checks"]["database"], ready.text
            for _ in range(3):
                r = httpx.post(f"{url}/v1/locate", files=tile, timeout=30)
                assert r.status_code == 200 and r.json()["prediction_id"] is None, r.text
            feedback = httpx.post(
                f"{url}/v1/predictions/{stored}/feedback", json={"lat": 1, "lon": 2}, timeout=10
            )
            assert feedback.status_code == 503, feedback.text
            assert feedback.headers["content-type"] == PROBLEM
            with make_sessionmaker(engine)() as session:
                assert set(session.scalars(select(Prediction.id))) == before
        finally:
            _set_read_only(private_pg, False)
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, 5, "200")
        r = httpx.post(f"{url}/v1/locate", files=tile, timeout=30)
        assert r.status_code == 200 and r.json()["prediction_id"], r.text
        new = r.json()["prediction_id"]
        with make_sessionmaker(engine)() as session:
            assert set(session.scalars(select(Prediction.id))) == before | {new}
    finally:
        engine.dispose()
    # no write reached the database while it was read-only: the poll saw it first
    assert _write_failures(url) == failures
