"""Real processes for the deployment tests: `geoloc serve` replicas, nginx with the shipped
config (deploy/nginx.conf rendered over loopback ports), a private PostgreSQL cluster, and a
bounded load generator. Every process runs in its own process group, killed on cleanup.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.net import free_port

ROOT = Path(__file__).resolve().parents[2]
NGINX_TEMPLATE = ROOT / "deploy" / "nginx.conf"
GEOLOC = Path(sys.executable).parent / "geoloc"
# Debian's server binaries, whichever major version is installed (the newest if several).
PG_BIN = max(
    Path("/usr/lib/postgresql").glob("*/bin"),
    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    default=Path("/usr/lib/postgresql/15/bin"),
)


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        time.sleep(step_s)


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal the process group the test started (start_new_session=True), if still there."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _get(url: str, timeout: float = 2.0) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=timeout)
    except httpx.HTTPError:
        return None


# -- nginx ------------------------------------------------------------------------------------


def render_nginx_conf(template: str, values: dict[str, str], upstreams: list[str]) -> str:
    """What the nginx image's template step makes of deploy/nginx.conf: ``${NAME}`` replaced
    from ``values``, and the line naming ``${GEOLOC_UPSTREAM}`` repeated once per address."""
    lines: list[str] = []
    for line in template.splitlines(keepends=True):
        if "${GEOLOC_UPSTREAM}" in line:
            lines += [line.replace("${GEOLOC_UPSTREAM}", address) for address in upstreams]
        else:
            lines.append(line)

    def value(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise KeyError(f"deploy/nginx.conf needs {m.group(1)}, which the test does not set")
        return values[m.group(1)]

    return re.sub(r"\$\{([A-Z0-9_]+)\}", value, "".join(lines))


class Nginx:
    """Debian's nginx, unprivileged ports, a private prefix; the shipped config inside."""

    def __init__(self, prefix: Path, port: int, upstreams: list[str], max_body: int) -> None:
        self.prefix, self.port = prefix, port
        self.url = f"http://127.0.0.1:{port}"
        for sub in ("logs", "tmp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        site = render_nginx_conf(
            NGINX_TEMPLATE.read_text(),
            {"NGINX_PORT": f"127.0.0.1:{port}", "GEOLOC_MAX_REQUEST_BYTES": str(max_body)},
            upstreams,
        )
        (prefix / "geoloc.conf").write_text(site)
        # As root, nginx's workers would switch to nobody, who cannot write this prefix.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
        temp = "".join(
            f"    {kind}_temp_path tmp/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (prefix / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid nginx.pid;\nerror_log logs/error.log warn;\n"
            "events { worker_connections 512; }\n"
            f"http {{\n    access_log logs/access.log;\n{temp}    include geoloc.conf;\n}}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = ["nginx", "-p", f"{self.prefix}/", "-c", "nginx.conf", "-g", "daemon off;"]
        check = subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=10)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(cmd, start_new_session=True)
        wait_until(lambda: _port_open(self.port), 10, "nginx listening")

    def error_log(self) -> str:
        path = self.prefix / "logs" / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc.wait(timeout=10)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- replicas ---------------------------------------------------------------------------------


@dataclass
class Replica:
    """One `geoloc serve` process (what the container runs), logging to a file."""

    name: str
    port: int
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**self.env, "GEOLOC_PORT": str(self.port), "GEOLOC_REPLICA_NAME": self.name}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(GEOLOC), "serve", "--log-level", "warning"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=ROOT,
            )

    def ready(self, path: str = "/readyz") -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"replica {self.name} exited: {self.log.read_text()[-3000:]}")
        r = _get(f"{self.url}{path}")
        return r is not None and r.status_code == 200

    def wait_ready(self, timeout_s: float = 120, path: str = "/readyz") -> None:
        wait_until(lambda: self.ready(path), timeout_s, f"replica {self.name} ready", step_s=0.3)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


def replica_env(data_dir: Path, database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOLOC_")}
    env.update(
        GEOLOC_DATA_DIR=str(data_dir),
        GEOLOC_DATABASE_URL=database_url,
        GEOLOC_INDEX_POLL_S="0.5",
        GEOLOC_MIGRATE_ON_START="true",
        GEOLOC_TORCH_THREADS="1",
        GEOLOC_SHUTDOWN_GRACE_S="20",
    )
    env.update(extra)
    return env


# -- private PostgreSQL -----------------------------------------------------------------------


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free port, to stop and start at will (the shared
    server on 5432 is never touched). Runs as the `postgres` user when the tests run as root."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="geoloc-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")

    def _run(self, *args: str, timeout: float = 60) -> None:
        done = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{args[0]}: {done.stdout}\n{done.stderr}"

    def init(self) -> None:
        self._run(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "--no-sync", "--no-instructions",
        )  # fmt: skip

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
            str(self.dir / "postgres.log"), "-w", "-t", "30", "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- load -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    status: int  # 0: no HTTP answer at all
    replica: str | None
    index_version: str | None
    content_type: str
    started: float
    seconds: float
    error: str | None = None


@dataclass
class Load:
    """``concurrency`` threads posting ``image`` to ``url`` until stopped, at most
    ``max_requests`` in all and never past ``max_seconds``."""

    url: str
    image: bytes
    concurrency: int = 4
    max_requests: int = 400
    max_seconds: float = 30.0
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _worker(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                with self._lock:
                    if len(self.outcomes) + self._inflight >= self.max_requests:
                        return
                    self._inflight += 1
                t0 = time.monotonic()
                try:
                    r = client.post(
                        self.url, files={"file": ("tile.jpg", self.image, "image/jpeg")}
                    )
                    version = r.json().get("index_version") if r.status_code == 200 else None
                    out = Outcome(
                        r.status_code,
                        r.headers.get("x-geoloc-replica"),
                        version,
                        r.headers.get("content-type", ""),
                        t0,
                        time.monotonic() - t0,
                        None if r.status_code == 200 else r.text[:300],
                    )
                except httpx.HTTPError as exc:
                    out = Outcome(0, None, None, "", t0, time.monotonic() - t0, repr(exc))
                with self._lock:
                    self._inflight -= 1
                    self.outcomes.append(out)

    def __post_init__(self) -> None:
        self._inflight = 0

    def start(self) -> Load:
        self._threads = [
            threading.Thread(target=self._worker, daemon=True) for _ in range(self.concurrency)
        ]
        for t in self._threads:
            t.start()
        return self

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait_for(self, n: int, timeout_s: float = 30) -> None:
        wait_until(lambda: self.count() >= n, timeout_s, f"{n} load requests", step_s=0.05)

    def run(self) -> list[Outcome]:
        """All ``max_requests`` (or until ``max_seconds``), then the outcomes."""
        self.start()
        for t in self._threads:
            t.join(timeout=self.max_seconds + 40)
        return list(self.outcomes)

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=40)
        return list(self.outcomes)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]


@contextlib.contextmanager
def running(load: Load) -> Iterator[Load]:
    load.start()
    try:
        yield load
    finally:
        load.stop()
