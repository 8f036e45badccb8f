"""`geoloc setup`: build what the default service runs with, once."""

from __future__ import annotations

import typer

from service.cli.common import db_errors, friendly_errors, settings


@friendly_errors
@db_errors
def setup_cmd() -> None:
    """Build what the default service runs with, once: migrate the database, build the
    default gallery (GEOLOC_DEFAULT_RES), the reference-image index refs-<profile> and the
    calibration (bluemarble renders its own tiles for both). Each step is skipped when its
    result exists and was made with the model's weights (else a new version is built beside
    it); an interrupted run resumes."""
    from service.jobs.setup import run_setup

    run_setup(settings(), echo=typer.echo)
