"""`geoloc serve`: the HTTP API under uvicorn.

The listening address is checked before anything heavy is imported, so that a port already
in use is one line at once; a single-worker server then binds before its lifespan loads the
model (service/api/server.py), so the port cannot be taken while it loads.
"""

from __future__ import annotations

import errno
import socket
from typing import Annotated

import typer

from service.cli.common import db_errors, fail, friendly_errors, settings

_BIND_ADVICE = {
    errno.EADDRINUSE: "the port is already in use (another server?); choose another with --port "
    "or GEOLOC_PORT",
    errno.EACCES: "permission denied (ports below 1024 need privileges); choose another with "
    "--port or GEOLOC_PORT",
    errno.EADDRNOTAVAIL: "no such address on this machine; check --host or GEOLOC_HOST",
}


def check_listen(host: str, port: int) -> None:
    """Fail with one line unless every address ``host`` resolves to can listen on ``port``
    now; binds the way asyncio's create_server (uvicorn's listener) does, then lets go."""
    if port == 0:  # the system picks a free port
        return
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        fail(f"cannot listen on {where}: {exc.strerror} (--host or GEOLOC_HOST)")
    for family, kind, proto, _, addr in dict.fromkeys(infos):
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:  # an address family this system lacks: uvicorn skips it too
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                why = _BIND_ADVICE.get(exc.errno or 0, exc.strerror or str(exc))
                fail(f"cannot listen on {where}: {why}")


@friendly_errors
def serve_cmd(
    host: Annotated[str | None, typer.Option(help="Listen address; default GEOLOC_HOST.")] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port; default GEOLOC_PORT.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Worker processes; default GEOLOC_WORKERS.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    migrate: Annotated[
        bool | None,
        typer.Option(
            "--migrate/--no-migrate",
            help="Wait for the database and migrate it first; default GEOLOC_MIGRATE_ON_START.",
        ),
    ] = None,
) -> None:
    """Serve the HTTP API (uvicorn; each worker loads the model and index once).

    On SIGTERM: /readyz turns 503, in-flight requests finish (GEOLOC_SHUTDOWN_GRACE_S), exit.
    """
    s = settings()
    host = host or s.host
    port = s.port if port is None else port
    check_listen(host, port)
    from service.api.server import prepare_database, serve

    if s.migrate_on_start if migrate is None else migrate:
        typer.echo(db_errors(prepare_database)(s))
    serve(s, host=host, port=port, workers=workers or s.workers, log_level=log_level)
