"""Database models (SQLAlchemy 2.0, typed). Portable across SQLite and PostgreSQL.

The schema only changes through Alembic (``migrations/``); these classes describe it and a
test checks that autogenerate finds no difference between them and the migrations.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

SCOPES: frozenset[str] = frozenset({"locate", "admin"})

# Named constraints: Alembic needs names to drop or alter them later (SQLite batch mode too).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every dialect.

    PostgreSQL keeps the zone (timestamptz); SQLite stores text without one and hands back
    naive values, so values are stored as naive UTC there and marked UTC again on the way out.
    A naive value given to us is taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class IndexVersion(Base):
    """A published index version (a directory under <data>/indexes) and whether it serves."""

    __tablename__ = "index_versions"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        # At most one active version per name, enforced by the database itself. Both SQLite
        # (3.8+) and PostgreSQL support partial indexes; other dialects get a plain index, and
        # activate_index keeps the rule in one transaction either way.
        Index(
            "uq_index_versions_active_name",
            "name",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    profile: Mapped[str] = mapped_column(String(64))
    gallery_kind: Mapped[str] = mapped_column(String(16))
    count: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    manifest: Mapped[dict[str, Any]]
    # When the version was built (from its manifest), not when the database heard of it.
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    active: Mapped[bool] = mapped_column(Boolean, default=False)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"


class ReferenceImage(Base):
    """A geotagged reference photo of an image-neighbour index (G3's geo-alignment stage)."""

    __tablename__ = "reference_images"
    __table_args__ = (UniqueConstraint("index_name", "external_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(255))
    index_name: Mapped[str] = mapped_column(String(64))
    uri: Mapped[str] = mapped_column(Text)
    lat: Mapped[float] = mapped_column(Float)
    lon: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key. Only a sha256 of the key is stored; the key itself is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    # Not unique: the first 8 characters carry only ~24 random bits after "glk_".
    prefix: Mapped[str] = mapped_column(String(8), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(100))  # comma-separated, e.g. "locate,admin"
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]

    @property
    def scope_set(self) -> frozenset[str]:
        return frozenset(s for s in self.scopes.split(",") if s)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


class Prediction(Base):
    """One located image: the top-1 answer in columns (for statistics), the rest as JSON."""

    __tablename__ = "predictions"

    # A random hex id: clients see it (to send feedback) and must not be able to guess others.
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    profile: Mapped[str] = mapped_column(String(64))
    index_version: Mapped[str] = mapped_column(String(129))  # "name/version"
    # Null when the request produced no candidate (e.g. a filter excluded every place).
    lat: Mapped[float | None] = mapped_column(Float)
    lon: Mapped[float | None] = mapped_column(Float)
    probability: Mapped[float | None] = mapped_column(Float)
    response: Mapped[dict[str, Any]]
    latency_ms: Mapped[float] = mapped_column(Float)
    api_key_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), index=True
    )
    client: Mapped[str | None] = mapped_column(String(255))


class Feedback(Base):
    """The true location of a predicted image. One per prediction: a new one replaces it."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prediction_id: Mapped[str] = mapped_column(
        ForeignKey("predictions.id", ondelete="CASCADE"), unique=True
    )
    lat: Mapped[float] = mapped_column(Float)
    lon: Mapped[float] = mapped_column(Float)
    # Null when the prediction had no candidate to measure from.
    error_km: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
