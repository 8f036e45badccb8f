"""`geoloc serve`: uvicorn, with the start-up and shutdown a replica behind a load balancer needs.

Start-up (GEOLOC_MIGRATE_ON_START): wait for the database, then migrate it to head under a lock,
so that replicas starting together migrate once and none serves an old schema.

Shutdown, on SIGTERM (what `docker stop` and Kubernetes send):

1. /readyz answers 503 at once (``ServiceState.draining``);
2. for GEOLOC_SHUTDOWN_DRAIN_S the replica keeps serving, so that a balancer polling readiness
   stops sending it requests (0 behind nginx, whose passive checks only see refused connects);
3. the listener closes: nginx's next connect fails and it tries another replica (a request that
   never reached a replica is safe to send again, even a POST);
4. requests in flight run to completion for up to GEOLOC_SHUTDOWN_GRACE_S (uvicorn's
   ``timeout_graceful_shutdown``; past it they are cancelled), then the lifespan shutdown runs.

A second signal skips what is left of the drain.
"""

from __future__ import annotations

import asyncio
import socket
import time
from types import FrameType

import uvicorn

from service.app import create_app
from service.db import display_url, upgrade, wait_for_database
from service.serving import ServiceState
from service.settings import Settings

#: After the listener closes, how long connections accepted just before get to read their
#: request. uvicorn closes a connection that has not begun a request when it shuts down, and
#: nginx does not resend a POST it already wrote to a connection that then closed.
ACCEPTED_SETTLE_S = 0.2


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
        for server in self.servers:
            server.close()  # stop accepting first
        await asyncio.sleep(ACCEPTED_SETTLE_S)
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
            "service.app:create_app",
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
    DrainingServer(config, app.state.service, s.shutdown_drain_s).run()
