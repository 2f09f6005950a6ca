"""API keys: the api_keys table's one owner. A key is stored as the sha256 of its secret, which is shown
once at creation and never stored."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.models import ApiKey

SCOPES = ("read", "train", "generate", "admin")
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
    """The unrevoked key with this secret, its last use stamped; None when there is none.

    One statement that writes first: no read-then-write transaction on the hot path of every request."""
    key = session.scalar(
        update(ApiKey)
        .where(ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None))
        .values(last_used_at=utcnow())
        .returning(ApiKey),
        execution_options={"synchronize_session": False},
    )
    session.commit()
    return key
