"""Fixtures of the deployment tests: one cluster per module (PostgreSQL database, Redis,
three `geoloc serve` replicas, nginx), a private PostgreSQL with its own replica, and a
process that runs `geoloc` commands quickly (build_zygote.py). All killed on teardown."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from encoders.bluemarble import render_tile
from service.config import Settings
from tests.conftest import fresh_postgres_database
from tests.deploy.cluster import (
    ROOT,
    Nginx,
    PrivatePostgres,
    Replica,
    kill_group,
    replica_env,
)
from tests.net import free_port

REDIS_URL = "redis://127.0.0.1:6379/0"
INDEX = "default-bluemarble"


class Zygote:
    """`geoloc` commands in forked children of one warm process (see build_zygote.py)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.deploy.build_zygote"],
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert json.loads(line) == {"ready": True}, line

    def run(
        self, *args: str, kill_after: float | None = None, counted_from: str | None = None
    ) -> dict[str, Any]:
        """Run `geoloc ARGS`, SIGKILLed kill_after seconds from the fork or, with counted_from
        (a glob), from when a new path matching it appears; the reply also carries the
        command's output ('output')."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        start = self.log.stat().st_size if self.log.exists() else 0
        request = {
            "args": list(args),
            "kill_after": kill_after,
            "counted_from": counted_from,
            "log": str(self.log),
        }
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self.proc.stdout.readline())
        with self.log.open("rb") as fh:
            fh.seek(start)
            reply["output"] = fh.read().decode(errors="replace")
        return reply

    def stop(self) -> None:
        kill_group(self.proc)
        self.proc.wait(timeout=10)


@dataclass
class Cluster:
    data_dir: Path
    database_url: str
    replicas: list[Replica]
    nginx: Nginx
    zygote: Zygote
    tile: bytes
    versions: list[str] = field(default_factory=list)

    def alive(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive()]


def tile_jpeg(lat: float = 23.0, lon: float = 12.0) -> bytes:
    buf = io.BytesIO()
    render_tile(lat, lon, 2.0, 64).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis unreachable at {REDIS_URL}: {exc}")
    return REDIS_URL


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        pg.init()
        yield pg
    finally:
        pg.destroy()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Cluster]:
    """Three replicas (r0, r1, r2) migrating one fresh database together on start, sharing one
    index directory and Redis, behind nginx; the first index version is built by the CLI while
    they start (they become ready once it exists)."""
    base = tmp_path_factory.mktemp("deploy")
    data_dir = base / "data"
    with fresh_postgres_database("geoloc_deploy") as db_url:
        prefix = f"geoloc-test-{base.name}"
        env = replica_env(data_dir, db_url, GEOLOC_REDIS_URL=redis_url, GEOLOC_REDIS_PREFIX=prefix)
        extra = {"r2": {"GEOLOC_SHUTDOWN_DRAIN_S": "1.5"}}
        replicas = [
            Replica(name, free_port(), {**env, **extra.get(name, {})}, base / f"{name}.log")
            for name in ("r0", "r1", "r2")
        ]
        upstreams = [f"127.0.0.1:{r.port}" for r in replicas]
        nginx = Nginx(base / "nginx", free_port(), upstreams, Settings().max_request_bytes)
        zygote = Zygote(env, base / "cli.log")
        try:
            for r in replicas:
                r.start()
            nginx.start()
            zygote.wait_ready()
            built = zygote.run("index", "build", INDEX, "--res", "2")
            assert built["status"] == 0, built["output"]
            tile = tile_jpeg()
            for r in replicas:
                r.wait_ready()
                # The first locate of a process is slow (first forward pass): not under test.
                warm = httpx.post(f"{r.url}/v1/locate", files={"file": tile}, timeout=120)
                assert warm.status_code == 200, warm.text
            c = Cluster(data_dir, db_url, replicas, nginx, zygote, tile)
            c.versions.append(built["output"].split(f"published {INDEX}/")[1].split(":")[0])
            yield c
        finally:
            for r in replicas:
                r.stop()
            nginx.stop()
            zygote.stop()


@pytest.fixture(scope="module")
def outage_replica(
    cluster: Cluster, private_pg: PrivatePostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    """A replica on the private PostgreSQL, started before that server: it waits for it."""
    log = tmp_path_factory.mktemp("outage") / "r-pg.log"
    env = replica_env(cluster.data_dir, private_pg.url, GEOLOC_INDEX_VERSION=cluster.versions[0])
    replica = Replica("r-pg", free_port(), env, log)
    replica.start()
    try:
        private_pg.start()
        replica.wait_ready()
        yield replica
    finally:
        replica.stop()
