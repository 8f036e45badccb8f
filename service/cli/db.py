"""`geoloc db upgrade|downgrade|current`: the database schema (Alembic migrations)."""

from __future__ import annotations

from typing import Annotated

import typer

from service.cli.common import db_errors, friendly_errors, settings

app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)


@app.command("upgrade")
@friendly_errors
@db_errors
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="First wait for the database (GEOLOC_DATABASE_START_TIMEOUT_S)."
        ),
    ] = False,
) -> None:
    """Create or migrate the database schema (safe to run again, and from several replicas at
    once: they take a lock and migrate one after the other)."""
    from service.db import current_revision, display_url, make_engine, upgrade, wait_for_database

    s = settings()
    url = s.db_url
    if wait:
        wait_for_database(url, s.database_start_timeout_s, s.database_connect_timeout_s)
    engine = make_engine(url)
    try:
        before = current_revision(engine)
    finally:
        engine.dispose()
    after = upgrade(url, revision, wait_s=s.database_start_timeout_s)
    if before == after:
        typer.echo(f"{display_url(url)}: already at {after}")
    else:
        typer.echo(f"{display_url(url)}: upgraded {before or 'empty'} -> {after}")


@app.command("downgrade")
@friendly_errors
@db_errors
def db_downgrade(
    revision: Annotated[
        str, typer.Argument(help="Target revision: '-1' for one step, 'base' drops all tables.")
    ],
) -> None:
    """Migrate the database schema down (loses the data of what is removed)."""
    from service.db import display_url, downgrade

    url = settings().db_url
    after = downgrade(url, revision)
    typer.echo(f"{display_url(url)}: now at {after or 'base (no tables)'}")


@app.command("current")
@friendly_errors
@db_errors
def db_current(
    check: Annotated[bool, typer.Option(help="Exit 1 unless the schema is at head.")] = False,
) -> None:
    """Show the database's schema revision and the one this geoloc needs."""
    from service.db import current_revision, display_url, head_revision, make_engine

    url = settings().db_url
    engine = make_engine(url)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    state = "at head" if current == head else "not at head: run `geoloc db upgrade`"
    typer.echo(f"{display_url(url)}: {current or 'empty'} (head {head}, {state})")
    if check and current != head:
        raise typer.Exit(1)
