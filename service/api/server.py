"""`geoloc serve`: uvicorn, with the start-up and shutdown a replica behind a load balancer needs.

Start-up (GEOLOC_MIGRATE_ON_START): wait for the database, then migrate it to head under a lock,
so that replicas starting together migrate once and none serves an old schema.

Shutdown, on SIGTERM (what `docker stop` and Kubernetes send):

1. /readyz answers 503 at once (``ServiceState.draining``);
2. for GEOLOC_SHUTDOWN_DRAIN_S the replica keeps serving, so that a balancer polling readiness
   stops sending it requests (0 behind nginx, whose passive checks only see refused connects);
3. the listener stops taking new connections, and only then closes: nginx's next connect fails and
   it tries another replica (a request that never reached a replica is safe to send again, even a
   POST). On Linux, new connection attempts are dropped first (a socket filter), the connections
   the kernel had already queued are accepted and served, and the listener closes once its queue
   is empty: closing it with connections queued would reset them after nginx had written its POST
   to them, which nginx may not resend. A dropped attempt is retried by the client's TCP stack
   and then refused (about a second later), so nginx still tries another replica;
4. requests in flight run to completion for up to GEOLOC_SHUTDOWN_GRACE_S (uvicorn's
   ``timeout_graceful_shutdown``; past it they are cancelled), then the lifespan shutdown runs.

A second signal skips what is left of the drain.

With GEOLOC_WORKERS > 1 a supervisor process binds the socket and runs that many worker
processes on it, each the same server as above (its own model, readiness and drain). It passes
SIGTERM and SIGINT on to all of them, so the replica drains as one; it replaces a worker that
dies, and stops when one cannot start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from service.api.main import create_app
from service.api.runtime import ServiceState
from service.config import Settings
from service.db import display_url, upgrade, wait_for_database

#: At most this long for the connections the kernel queued before new ones were refused to be
#: accepted, and again for connections accepted just before the listener closed to begin their
#: request: uvicorn closes a connection that has not begun one when it shuts down, and nginx
#: does not resend a POST it already wrote to a connection that then closed.
ACCEPTED_SETTLE_S = 1.0
_log = logging.getLogger("uvicorn.error")
_POLL_S = 0.01

# Classic BPF on a TCP listener (the packet starts at the TCP header): drop a segment whose
# flags byte has SYN set and ACK clear (a new connection attempt), keep everything else.
_SYN_DROP = (
    (0x30, 0, 0, 13),  # ldb [13]        TCP flags
    (0x54, 0, 0, 0x12),  # and #SYN|ACK
    (0x15, 0, 1, 0x02),  # jeq #SYN        → drop, else keep
    (0x06, 0, 0, 0),  # ret #0          drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1         keep
)
_SO_ATTACH_FILTER = 26
_TCPI_UNACKED = 24  # offset of tcpi_unacked: a listener's accept-queue length


def refuse_new_connections(sock: socket.socket) -> bool:
    """Make a TCP listener drop new connection attempts while it still accepts the connections
    already queued (Linux). False where it cannot (another system, not a TCP socket)."""
    if not sys.platform.startswith("linux") or sock.family not in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        return False
    program = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in _SYN_DROP))
    fprog = struct.pack("HL", len(_SYN_DROP), ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


def accept_queue_length(sock: socket.socket) -> int:
    """Connections the kernel has established on a listener that were not accepted yet (Linux)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, _TCPI_UNACKED)[0])


async def _settle(done: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``done`` until it holds or ``timeout_s`` passes, at least one poll interval."""
    deadline = time.monotonic() + timeout_s
    await asyncio.sleep(_POLL_S)
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(_POLL_S)


def _fresh(connections: Iterable[object]) -> bool:
    """Whether a connection was accepted but has not begun a request (uvicorn's HTTP protocols
    create ``cycle`` when a request's headers arrive)."""
    return any(getattr(c, "cycle", True) is None for c in connections)


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with a readiness flag and an optional drain before the listener closes."""

    def __init__(self, config: uvicorn.Config, state: ServiceState, drain_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_s = drain_s
        self._drain: tuple[float, int] | None = None  # (deadline, signal) while draining

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: set flags only (no logging, no locks).
        self.state.begin_drain()
        if self.drain_s > 0 and self._drain is None and not self.should_exit:
            self._drain = (time.monotonic() + self.drain_s, sig)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain is not None and not self.should_exit:
            deadline, sig = self._drain
            if time.monotonic() >= deadline:
                super().handle_exit(sig, None)
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        listeners = [s for server in self.servers for s in server.sockets]
        if listeners and all(refuse_new_connections(s) for s in listeners):  # type: ignore[arg-type]
            await _settle(
                lambda: all(accept_queue_length(s) == 0 for s in listeners),  # type: ignore[arg-type]
                ACCEPTED_SETTLE_S,
            )
        for server in self.servers:
            server.close()  # stop accepting before uvicorn closes idle connections
        await _settle(lambda: not _fresh(self.server_state.connections), ACCEPTED_SETTLE_S)
        await super().shutdown(sockets)


def prepare_database(s: Settings) -> str:
    """Wait for the database, migrate it to head (under the migration lock); a status line."""
    wait_for_database(s.db_url, s.database_start_timeout_s, s.database_connect_timeout_s)
    revision = upgrade(s.db_url, wait_s=s.database_start_timeout_s)
    return f"{display_url(s.db_url)}: at {revision}"


def serve(s: Settings, *, host: str, port: int, workers: int, log_level: str) -> None:
    """Run the HTTP API until SIGTERM/SIGINT (see the module docstring)."""
    config = uvicorn.Config(
        "service.api.main:create_app",  # only for bind_socket; each process builds its own app
        host=host,
        port=port,
        log_level=log_level,
    )
    # Bound before the lifespan loads the model: the port is ours from here on, and a port
    # taken meanwhile is reported now, not after the model and index have loaded.
    sock = config.bind_socket()
    if workers == 1:
        if not _serve_one(s, sock, host, port, log_level):
            raise SystemExit(STARTUP_FAILED)
        return
    Supervisor(share_threads(s, workers), sock, (host, port, log_level)).run()


#: The thread pools a worker's libraries size from the environment when they load (OpenMP for
#: torch's and faiss's kernels, the BLAS of numpy).
_POOL_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a
    container's CPU limit) where one is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def share_threads(s: Settings, workers: int) -> Settings:
    """Divide the cores among the workers: each gets cores // workers threads (at least one)
    for torch (GEOLOC_TORCH_THREADS, unless set) and for the OpenMP and BLAS pools (unless
    their variables are set), so that the workers do not oversubscribe the machine."""
    cores = available_cores()
    per = max(1, cores // workers)
    for var in _POOL_VARS:
        os.environ.setdefault(var, str(per))  # inherited by the workers, read when they load
    threads = s.torch_threads or per
    _log.info(
        "supervisor: %d workers on %d cores: %d torch threads and %s OpenMP threads each",
        workers,
        cores,
        threads,
        os.environ["OMP_NUM_THREADS"],
    )
    return s.model_copy(update={"torch_threads": threads, "workers": workers})


def _serve_one(s: Settings, sock: socket.socket, host: str, port: int, log_level: str) -> bool:
    """One process's server on a bound socket; whether it started serving."""
    app = create_app(s)
    config = uvicorn.Config(
        app,
        host=host,  # for the start-up message only: the socket is bound already
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=s.shutdown_grace_s,  # type: ignore[arg-type]
    )
    server = DrainingServer(config, app.state.service, s.shutdown_drain_s)
    server.run(sockets=[sock])
    return server.started


#: Exit code of a process that never started serving (its start-up failed: a data dir that is
#: a file, a database URL it cannot use, ...), uvicorn's own; the supervisor stops instead of
#: starting such a worker again and again.
STARTUP_FAILED = STARTUP_FAILURE
_PR_SET_PDEATHSIG = 1


def _forget_worker(pid: int | None) -> None:
    """Drop a dead worker's live gauges (its counters stay: they are the replica's history)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path and pid is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)


def _worker(s: Settings, sock: socket.socket, where: tuple[str, int, str]) -> None:
    """A worker process: the same server as a single-process replica, readiness and drain
    included. It gets SIGTERM if the supervisor dies, so that no orphan keeps the port."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    try:
        started = _serve_one(s, sock, *where)
    except Exception:
        _log.exception("worker [%d]: cannot build the app", os.getpid())
        started = False
    if not started:
        sys.exit(STARTUP_FAILED)


class Supervisor:
    """Runs ``s.workers`` processes that share one listening socket, each a full replica process
    (its own model, readiness flag and drain). SIGTERM/SIGINT are passed on to every worker, so
    all of them turn /readyz 503 at once and drain as one process does; the supervisor exits
    when they have. A worker that dies on its own is replaced; one that could not start stops
    them all (it would fail the same way again)."""

    def __init__(self, s: Settings, sock: socket.socket, where: tuple[str, int, str]) -> None:
        self.settings, self.sock, self.n, self.where = s, sock, s.workers, where
        self.ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.signals: list[int] = []
        self.stopping = False  # a signal came, or a worker could not start
        self.failed = False

    def _spawn(self) -> multiprocessing.process.BaseProcess:
        proc = self.ctx.Process(
            target=_worker, args=(self.settings, self.sock, self.where), daemon=False
        )
        proc.start()
        return proc

    def run(self) -> None:
        previous = {
            sig: signal.signal(sig, lambda sig, frame: self.signals.append(sig))
            for sig in (signal.SIGTERM, signal.SIGINT)
        }
        metrics_dir = self._metrics_dir()
        try:
            self.procs = [self._spawn() for _ in range(self.n)]
            _log.info("supervisor [%d]: %d workers", os.getpid(), self.n)
            while self._tick():
                time.sleep(0.1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for p in self.procs:
                if p.is_alive():  # only after the loop was interrupted by an error
                    p.kill()
                p.join()
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
        if self.failed:
            raise SystemExit(STARTUP_FAILED)

    @staticmethod
    def _metrics_dir() -> str | None:
        """One directory for the workers' metric files, so that a scrape of any worker counts
        the whole replica (service/api/metrics.py). Set in the environment the workers inherit,
        before they import prometheus_client. An operator's PROMETHEUS_MULTIPROC_DIR is used
        (emptied of an earlier run's files); else a temporary one, removed at exit."""
        given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if given:
            Path(given).mkdir(parents=True, exist_ok=True)
            for old in Path(given).glob("*.db"):
                old.unlink()
            return None
        made = tempfile.mkdtemp(prefix="geoloc-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
        return made

    def _tick(self) -> bool:
        """Pass signals on and handle the workers that have exited; whether any still runs.
        Which ones run is read once, first: a worker that exits meanwhile counts as running
        until the next tick judges its exit (one that could not start is never missed, even
        when all of them exit between two ticks)."""
        while self.signals:  # pass every signal on: a second one skips the drain there too
            self.stopping = True
            self._signal_all(self.signals.pop(0))
        alive = [p.is_alive() for p in self.procs]
        for i, p in enumerate(self.procs):
            if alive[i] or self.stopping:
                continue
            if p.exitcode == STARTUP_FAILED:
                _log.error("supervisor: worker [%s] could not start; stopping", p.pid)
                self.stopping = self.failed = True
                self._signal_all(signal.SIGTERM)
                break
            _log.error("supervisor: worker [%s] exited (%s); starting another", p.pid, p.exitcode)
            p.join()
            _forget_worker(p.pid)
            self.procs[i] = self._spawn()
            alive[i] = True
        return any(alive)

    def _signal_all(self, sig: int) -> None:
        for p in self.procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)
