"""API keys: the api_keys table's one owner. A key is stored as the sha256 of its secret, which is shown
once at creation and never stored."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.models import ApiKey

SCOPES = ("read", "train", "generate", "admin")
LAST_USED_EVERY_S = 60
KEY_PREFIX = "gpt-"


def hash_key(secret: str) -> str:
    """sha256 is enough: keys are 32 random bytes, so there is nothing to brute-force."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_api_key(session: Session, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
    """Store a new key (hashed) and return it with the secret."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}; got {', '.join(scopes) or 'none'}")
    secret = new_key_secret()
    key = ApiKey(name=name, key_hash=hash_key(secret), prefix=secret[:10], scopes=",".join(scopes))
    session.add(key)
    session.commit()
    return key, secret


def find_active_key(session: Session, secret: str) -> ApiKey | None:
    """The unrevoked key with this secret; None when there is none. Its last use is stamped at most
    once every LAST_USED_EVERY_S: a stamp on every request made every authenticated request a write
    transaction (SQLite runs one at a time) for a field read to the minute. The read's transaction
    ends before the stamp's begins, so no transaction upgrades from read to write."""
    key = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None))
    )
    session.commit()
    if key is None:
        return None
    now = utcnow()
    if key.last_used_at is None or (now - key.last_used_at).total_seconds() >= LAST_USED_EVERY_S:
        session.execute(
            update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now),
            execution_options={"synchronize_session": False},
        )
        session.commit()
        key.last_used_at = now
    return key
