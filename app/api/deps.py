"""Dependencies shared by the routes: the settings, a database session, API-key auth, and the
adapter a generation request names."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import utcnow
from app.exceptions import Forbidden, Unauthorized
from app.inference.engine import InferenceEngine
from app.inference.types import AdapterSpec
from app.models import ApiKey
from app.registry import find_adapter

SCOPES = ("read", "train", "generate", "admin")
KEY_PREFIX = "gpt-"


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


# Why the session dependencies are async and scope="function": a sync dependency with yield runs its
# exit code in the thread pool, after the response is sent. Under load every pool thread is busy with
# a request that waits for a database connection, while the connections are held by finished
# requests whose exit code waits for a thread: nothing moves until the pool's timeout, and each
# waiting request ends in a 500. Here the session is closed on the event loop as soon as the route
# function returns, so a request holds a connection only while its route runs.
async def get_session(request: Request) -> AsyncIterator[Session]:
    session: Session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        session.close()


async def get_write_session(request: Request) -> AsyncIterator[Session]:
    """For routes that read and then write (BEGIN IMMEDIATE on SQLite; see app.db.make_sessionmaker)."""
    session: Session = request.app.state.write_sessionmaker()
    try:
        yield session
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
WriteSessionDep = Annotated[Session, Depends(get_write_session, scope="function")]

# auto_error=False: a missing header is our 401 with our error body, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="An API key from scripts/create_api_key.py")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def hash_key(secret: str) -> str:
    """sha256 is enough: keys are 32 random bytes, so there is nothing to brute-force."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_api_key(session: Session, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
    """Store a new key (hashed) and return it with the secret, which is shown once and never stored."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}; got {', '.join(scopes) or 'none'}")
    secret = new_key_secret()
    key = ApiKey(name=name, key_hash=hash_key(secret), prefix=secret[:10], scopes=",".join(scopes))
    session.add(key)
    session.commit()
    return key, secret


def _authenticate(session: Session, credentials: HTTPAuthorizationCredentials | None) -> ApiKey:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", field="Authorization")
    # One statement that writes first: no read-then-write transaction on the hot path of every request.
    key = session.scalar(
        update(ApiKey)
        .where(ApiKey.key_hash == hash_key(credentials.credentials), ApiKey.revoked_at.is_(None))
        .values(last_used_at=utcnow())
        .returning(ApiKey),
        execution_options={"synchronize_session": False},
    )
    session.commit()
    if key is None:
        raise Unauthorized("unknown or revoked API key", field="Authorization")
    return key


def require_scope(scope: str) -> Callable[..., ApiKey | None]:
    """A dependency (use as `Depends(require_scope("train"))`) that lets a request through when its key
    has `scope` or admin. Returns the key, or None in auth=none mode."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def check(request: Request, session: SessionDep, credentials: BearerDep) -> ApiKey | None:
        if request.app.state.settings.auth == "none":
            return None
        key = _authenticate(session, credentials)
        granted = set(key.scopes.split(","))
        if scope not in granted and "admin" not in granted:
            raise Forbidden(f"this API key lacks the '{scope}' scope", field="Authorization")
        request.state.api_key_id = key.id
        return key

    return check


ReadKey = Annotated[ApiKey | None, Depends(require_scope("read"))]
TrainKey = Annotated[ApiKey | None, Depends(require_scope("train"))]
GenerateKey = Annotated[ApiKey | None, Depends(require_scope("generate"))]
AdminKey = Annotated[ApiKey | None, Depends(require_scope("admin"))]


def resolve_adapter(session: Session, engine: InferenceEngine, ref: str | None) -> AdapterSpec | None:
    """The registry row for `ref` (id or name) as the engine's AdapterSpec: NotFound 404, or Conflict
    409 when it is for another base than the engine's."""
    if ref is None:
        return None
    row = find_adapter(session, ref)
    spec = AdapterSpec(
        id=row.id,
        name=row.name,
        path=Path(row.path),
        fingerprint=row.base_fingerprint,
        base_model=row.base_model,
    )
    engine.check_adapter(spec)
    return spec
