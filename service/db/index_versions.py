"""The registry of published index versions and which one is active."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from index.manifest import Manifest, list_indexes
from service.db.models import (
    IndexVersion,
    utcnow,
)
from service.db.predictions import _aware
from service.db.session import _begin_write, _commit
from service.errors import NotFoundError


def _manifest_time(text: str) -> datetime:
    try:
        return _aware(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        return utcnow()


def _find_version(session: Session, name: str, version: str) -> IndexVersion | None:
    return session.scalar(
        select(IndexVersion).where(IndexVersion.name == name, IndexVersion.version == version)
    )


def register_index_version(session: Session, manifest: Manifest, path: str | Path) -> IndexVersion:
    """Record a published index version; registering it again refreshes it from its manifest
    (the files on disk are the truth) and keeps whether it is active."""
    _begin_write(session)
    values = {
        "profile": manifest.profile,
        "gallery_kind": manifest.gallery_kind,
        "count": int(manifest.count),
        "path": str(path),
        "manifest": json.loads(manifest.to_json()),
        "created_at": _manifest_time(manifest.created_at),
    }
    row = _find_version(session, manifest.name, manifest.version)
    if row is None:
        try:
            with session.begin_nested():
                row = IndexVersion(
                    name=manifest.name, version=manifest.version, active=False, **values
                )
                session.add(row)
        except IntegrityError:
            row = _find_version(session, manifest.name, manifest.version)  # another replica won
            if row is None:
                raise
    for key, value in values.items():
        setattr(row, key, value)
    _commit(session)
    return row


def sync_index_versions(session: Session, root: str | Path) -> list[IndexVersion]:
    """Register every published version under ``root`` (so versions built before the database
    existed appear). Versions deleted from disk keep their rows: they are history."""
    base = Path(root).resolve() / "indexes"  # index.manifest's layout: <root>/indexes/<name>/<ver>
    return [
        register_index_version(session, m, base / m.name / m.version) for m in list_indexes(root)
    ]


def list_index_versions(session: Session, name: str | None = None) -> list[IndexVersion]:
    q = select(IndexVersion).order_by(IndexVersion.name, IndexVersion.version)
    if name is not None:
        q = q.where(IndexVersion.name == name)
    return list(session.scalars(q))


def activate_index(session: Session, name: str, version: str) -> IndexVersion:
    """Make ``name/version`` the one active version of ``name``, in one transaction."""
    _begin_write(session)
    # Lock every row of this name (PostgreSQL; SQLite serialises writers anyway) so concurrent
    # activations run one after the other; ordered by id so they never deadlock.
    rows = session.scalars(
        select(IndexVersion)
        .where(IndexVersion.name == name)
        .order_by(IndexVersion.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    target = next((r for r in rows if r.version == version), None)
    if target is None:
        session.rollback()
        known = [r.version for r in rows]
        raise NotFoundError(
            f"index {name!r} has no registered version {version!r}; known versions: "
            f"{known or 'none'}; build one with `geoloc index build`"
        )
    try:
        # Deactivate first, in its own statement: the partial unique index allows one active
        # row per name at every moment, not only at commit.
        session.execute(
            update(IndexVersion)
            .where(
                IndexVersion.name == name,
                IndexVersion.id != target.id,
                IndexVersion.active.is_(True),
            )
            .values(active=False)
        )
        session.execute(
            update(IndexVersion).where(IndexVersion.id == target.id).values(active=True)
        )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return target


def active_index_version(session: Session, name: str) -> IndexVersion | None:
    return session.scalar(
        select(IndexVersion).where(IndexVersion.name == name, IndexVersion.active.is_(True))
    )
