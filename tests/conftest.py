"""Shared fixtures: small real models and galleries built in the tests (no CLIP weights), and
the PostgreSQL database of the test session.

PostgreSQL: a fresh database per test session (``geoloc_test_<random>`` on the server named by
GEOLOC_TEST_POSTGRES_URL, default 127.0.0.1:5432 as postgres), dropped at the end. Tests on it
are skipped, saying why, only when the server is unreachable.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from collections.abc import Iterator

import pytest
import torch
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from torch import nn

from encoders.gps import GPSTower
from encoders.image import ImageTower, mlp_head
from encoders.model import GeoModel
from encoders.profiles import geoclip_weight_files


class FeatureBackbone(nn.Module):
    """Stands in for the CLIP visual tower when tests inject 768-d features directly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@functools.cache
def _geoclip_heads() -> GeoModel:
    files = geoclip_weight_files()
    gps = GPSTower()
    gps.load_state_dict(torch.load(files["gps"], weights_only=True))
    tower = ImageTower(FeatureBackbone(), mlp_head((768, 768, 512)))
    tower.head.load_state_dict(torch.load(files["head"], weights_only=True))
    model = GeoModel(tower, gps, preprocess=lambda im: im, profile="geoclip")
    with torch.no_grad():
        model.logit_scale.copy_(torch.load(files["logit_scale"], weights_only=True).reshape(()))
    return model.eval()


@pytest.fixture(scope="session")
def geoclip_heads() -> GeoModel:
    """GeoCLIP's real head, GPS tower and logit scale; no image backbone."""
    return _geoclip_heads()


PG_ADMIN_URL = os.environ.get(
    "GEOLOC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@contextlib.contextmanager
def fresh_postgres_database(prefix: str = "geoloc_test") -> Iterator[str]:
    """A new, empty database ``<prefix>_<random>`` (its URL), dropped afterwards; skips the
    test, saying why, when the server is unreachable."""
    admin = create_engine(
        PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    name = f"{prefix}_{secrets.token_hex(4)}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except OperationalError as exc:
        admin.dispose()
        first = str(exc.orig or exc).strip().splitlines()[0]
        pytest.skip(f"PostgreSQL unreachable at {make_url(PG_ADMIN_URL)!r}: {first}")
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    with fresh_postgres_database() as url:
        yield url
