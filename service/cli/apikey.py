"""`geoloc apikey create|list|revoke`: API keys for the HTTP API."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import typer

from service.cli.common import db_errors, db_session, friendly_errors, settings

app = typer.Typer(help="API keys for the HTTP API.", no_args_is_help=True)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value is not None else "-"


@app.command("create")
@friendly_errors
@db_errors
def apikey_create(
    name: Annotated[str, typer.Argument(help="Who or what uses the key.")],
    scope: Annotated[
        list[str] | None, typer.Option(help="locate and/or admin (repeat); default locate.")
    ] = None,
) -> None:
    """Create an API key and print it: it is shown only this once."""
    from service.db import create_api_key

    with db_session(settings()) as session:
        key, row = create_api_key(session, name, scope or ["locate"])
    typer.echo(key)
    typer.echo(
        f"created key {row.id} {row.name!r} (prefix {row.prefix}, scopes {row.scopes}); "
        "store it now: it cannot be shown again",
        err=True,
    )


@app.command("list")
@friendly_errors
@db_errors
def apikey_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List API keys (prefixes only: the keys themselves are not stored)."""
    from service.db import list_api_keys

    with db_session(settings()) as session:
        rows = list_api_keys(session)
    if as_json:
        out = [
            {
                "id": r.id,
                "name": r.name,
                "prefix": r.prefix,
                "scopes": sorted(r.scope_set),
                "created_at": r.created_at.isoformat(),
                "last_used_at": r.last_used_at.isoformat() if r.last_used_at else None,
                "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
            }
            for r in rows
        ]
        typer.echo(json.dumps(out, indent=2))
        return
    if not rows:
        typer.echo("no API keys yet: geoloc apikey create NAME")
    for r in rows:
        status = f"revoked {_when(r.revoked_at)}" if r.revoked_at else "active"
        typer.echo(
            f"{r.id:>4}  {r.prefix}  {r.name:20s} {r.scopes:14s} created {_when(r.created_at)}  "
            f"last used {_when(r.last_used_at)}  {status}"
        )


@app.command("revoke")
@friendly_errors
@db_errors
def apikey_revoke(
    key: Annotated[str, typer.Argument(help="Key id or prefix, as `geoloc apikey list` shows.")],
) -> None:
    """Revoke an API key: requests using it are refused from now on."""
    from service.db import revoke_api_key

    with db_session(settings()) as session:
        row = revoke_api_key(session, key)
    typer.echo(
        f"revoked key {row.id} {row.name!r} (prefix {row.prefix}) at {_when(row.revoked_at)}"
    )
