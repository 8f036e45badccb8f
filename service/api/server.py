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
"""

from __future__ import annotations

import asyncio
import ctypes
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable
from types import FrameType

import uvicorn

from service.api.main import create_app
from service.api.runtime import ServiceState
from service.config import Settings
from service.db import display_url, upgrade, wait_for_database

#: At most this long for the connections the kernel queued before new ones were refused to be
#: accepted, and again for connections accepted just before the listener closed to begin their
#: request: uvicorn closes a connection that has not begun one when it shuts down, and nginx
#: does not resend a POST it already wrote to a connection that then closed.
ACCEPTED_SETTLE_S = 1.0
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
    if workers > 1:
        # uvicorn's own supervisor runs the workers: graceful (in-flight requests finish within
        # the grace period) but without the readiness flag or the drain.
        uvicorn.run(
            "service.api.main:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            timeout_graceful_shutdown=s.shutdown_grace_s,  # type: ignore[arg-type]
        )
        return
    app = create_app(s)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=s.shutdown_grace_s,  # type: ignore[arg-type]
    )
    # Bound before the lifespan loads the model: the port is ours from here on, and a port
    # taken meanwhile is reported now, not after the model and index have loaded.
    sock = config.bind_socket()
    DrainingServer(config, app.state.service, s.shutdown_drain_s).run(sockets=[sock])
