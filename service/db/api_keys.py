"""API keys: created, listed, revoked and checked (stored as hashes only)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import (
    SCOPES,
    ApiKey,
    utcnow,
)
from service.db.session import _begin_write, _commit
from service.errors import InvalidOptionError, NotFoundError

KEY_PREFIX = "glk_"
PREFIX_LEN = 8
# last_used_at is refreshed at most this often: a write per request would cost more than the
# minute of precision is worth.
LAST_USED_PRECISION = timedelta(minutes=1)


def _hash_key(plaintext: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def _check_scopes(scopes: Iterable[str]) -> list[str]:
    wanted = sorted({s.strip().lower() for s in scopes if s.strip()})
    unknown = [s for s in wanted if s not in SCOPES]
    if unknown:
        raise InvalidOptionError(f"unknown scope(s) {unknown}; known: {sorted(SCOPES)}")
    if not wanted:
        raise InvalidOptionError(f"an API key needs at least one scope: {sorted(SCOPES)}")
    return wanted


def create_api_key(session: Session, name: str, scopes: Sequence[str]) -> tuple[str, ApiKey]:
    """A new key: returns (plaintext, row). The plaintext is not stored and never shown again."""
    _begin_write(session)
    name = name.strip()
    if not name or len(name) > 100:
        raise InvalidOptionError("an API key needs a name of 1-100 characters")
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        name=name,
        prefix=plaintext[:PREFIX_LEN],
        key_hash=_hash_key(plaintext),
        scopes=",".join(_check_scopes(scopes)),
        created_at=utcnow(),
    )
    session.add(row)
    _commit(session)
    return plaintext, row


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_api_key(session: Session, key_id_or_prefix: int | str) -> ApiKey:
    """Revoke a key by id, prefix (as listed) or the whole key. Revoking twice is a no-op."""
    _begin_write(session)
    ref = str(key_id_or_prefix).strip()
    if ref.isdigit():
        rows = list(session.scalars(select(ApiKey).where(ApiKey.id == int(ref))))
    elif ref.startswith(KEY_PREFIX) and len(ref) > PREFIX_LEN:
        rows = list(session.scalars(select(ApiKey).where(ApiKey.key_hash == _hash_key(ref))))
    else:
        rows = list(session.scalars(select(ApiKey).where(ApiKey.prefix == ref)))
    if not rows:
        raise NotFoundError(f"no API key with id or prefix {ref!r}; see `geoloc apikey list`")
    if len(rows) > 1:
        ids = ", ".join(str(r.id) for r in rows)
        raise InvalidOptionError(f"prefix {ref!r} matches keys {ids}: revoke by id")
    row = rows[0]
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        _commit(session)
    return row


def authenticate(session: Session, plaintext: str) -> ApiKey | None:
    """The live key matching ``plaintext``, or None (unknown, malformed or revoked)."""
    if not isinstance(plaintext, str) or not plaintext.startswith(KEY_PREFIX):
        return None
    digest = _hash_key(plaintext)
    candidates = session.scalars(select(ApiKey).where(ApiKey.prefix == plaintext[:PREFIX_LEN]))
    for row in candidates:
        if hmac.compare_digest(row.key_hash, digest):
            if row.revoked_at is not None:
                return None
            now = utcnow()
            if row.last_used_at is None or now - row.last_used_at >= LAST_USED_PRECISION:
                # End the read before writing: the write transaction must begin as one.
                _commit(session)
                _begin_write(session)
                row.last_used_at = now
                _commit(session)
            return row
    return None
