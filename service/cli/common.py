"""What every `geoloc` command shares: error handling, settings, database sessions.

Light on purpose: `geoloc --help` imports every command module, so a command module imports
at its top only this, typer and the standard library; anything heavier (torch, faiss,
SQLAlchemy, the settings) is imported inside the command that needs it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer

from service.errors import GeolocError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from service.config import Settings

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def usage_error(message: str) -> NoReturn:
    """A command called the wrong way: its usage line, where to find help, then the error."""
    try:
        from typer._click.globals import get_current_context  # typer vendors click (0.2x)
    except ImportError:  # older typer runs on click itself
        from click import get_current_context
    ctx = get_current_context(silent=True)
    if ctx is not None:
        typer.echo(ctx.get_usage(), err=True)
        typer.echo(f"Try '{ctx.command_path} --help' for help.\n", err=True)
    fail(message)


def friendly_errors(fn: F) -> F:
    """Every expected failure becomes one 'error: ...' line and exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except GeolocError as exc:
            fail(f"[{exc.type}] {exc.detail}")
        except (ValueError, FileNotFoundError, PermissionError, KeyError) as exc:
            fail(str(exc) if not isinstance(exc, KeyError) else str(exc.args[0]))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


def settings() -> Settings:
    from service.config import Settings

    return Settings()


def db_errors(fn: F) -> F:
    """Database failures (unreachable server, bad credentials...) become one error line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            # Only a command that imported SQLAlchemy can raise its errors: none to catch else.
            sa_exc = sys.modules.get("sqlalchemy.exc")
            if sa_exc is None or not isinstance(exc, sa_exc.SQLAlchemyError):
                raise
            from service.db import error_line

            fail(f"[database-error] {error_line(exc)}")

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def db_session(s: Settings) -> Iterator[Session]:
    """A session on a database whose schema is at head (else SchemaNotAtHeadError)."""
    from service import db

    engine = db.make_engine(s.db_url, s.database_wait_s)
    try:
        db.check_at_head(engine)
        with db.make_sessionmaker(engine)() as session:
            yield session
    finally:
        engine.dispose()
