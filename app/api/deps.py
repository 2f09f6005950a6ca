"""Dependencies shared by the routes: the settings, a database session, API-key auth, and the
adapter a generation request names."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app import keys
from app.config import Settings
from app.exceptions import Forbidden, Unauthorized
from app.inference.base import Engine
from app.inference.types import AdapterSpec
from app.models import ApiKey
from app.registry import find_adapter


# The dependencies every generation passes through are async: FastAPI runs a sync one in its thread
# pool, and each such hop waits for the GIL behind the event loop and the engine thread; under a burst
# of requests the hops were a good part of the time before a request reached the engine.
async def get_settings(request: Request) -> Settings:
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


def _authenticate(session: Session, credentials: HTTPAuthorizationCredentials | None) -> ApiKey:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", field="Authorization")
    key = keys.find_active_key(session, credentials.credentials)
    if key is None:
        raise Unauthorized("unknown or revoked API key", field="Authorization")
    return key


def require_scope(scope: str) -> Callable[..., Awaitable[ApiKey | None]]:
    """A dependency (use as `Depends(require_scope("train"))`) that lets a request through when its key
    has `scope` or admin. Returns the key, or None in auth=none mode."""
    if scope not in keys.SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    async def check(request: Request, session: SessionDep, credentials: BearerDep) -> ApiKey | None:
        if request.app.state.settings.auth == "none":
            return None
        key = await anyio.to_thread.run_sync(_authenticate, session, credentials)  # a database read
        granted = set(key.scopes.split(","))
        if scope not in granted and "admin" not in granted:
            raise Forbidden(f"this API key lacks the '{scope}' scope", field="Authorization")
        request.state.api_key_id = key.id
        return key

    return check


def owner_of(key: ApiKey | None) -> str | None:
    """The owner whose objects `key` may see (app.owners): its own id, or None (everything) for an
    admin key and with auth=none."""
    if key is None or "admin" in key.scopes.split(","):
        return None
    return key.id


def key_id(key: ApiKey | None) -> str | None:
    """The owner recorded on what `key` creates (None with auth=none)."""
    return None if key is None else key.id


ReadKey = Annotated[ApiKey | None, Depends(require_scope("read"))]
TrainKey = Annotated[ApiKey | None, Depends(require_scope("train"))]
# One callable for the generate routers' own dependency and GenerateKey, so FastAPI checks a key once.
generate_scope = require_scope("generate")
GenerateKey = Annotated[ApiKey | None, Depends(generate_scope)]
AdminKey = Annotated[ApiKey | None, Depends(require_scope("admin"))]


def resolve_adapter(
    session: Session, engine: Engine, ref: str | None, *, owner: str | None = None
) -> AdapterSpec | None:
    """The registry row for `ref` (id or name) as the engine's AdapterSpec: NotFound 404, or Conflict
    409 when it is for another base than the engine's."""
    if ref is None:
        return None
    row = find_adapter(session, ref, owner=owner)
    spec = AdapterSpec(
        id=row.id,
        name=row.name,
        path=Path(row.path),
        fingerprint=row.base_fingerprint,
        base_model=row.base_model,
    )
    engine.check_adapter(spec)
    return spec


class AdapterLookup:
    """resolve_adapter for the generation routes, each answer remembered for TTL_S.

    Every generation names an adapter, and looking it up (a registry query, the folder's manifest and
    weights checked) was a third of the API's own time per request: a burst of 64 requests for 4
    adapters paid it 64 times on the event loop before the last one reached vLLM. A remembered answer
    is the registry's of at most TTL_S ago. Deleting an adapter through this API forgets every answer
    at once (DELETE /adapters), so only a deletion by another API process can be seen late, for at
    most TTL_S. Refusals (404, 409) are not remembered: an adapter the worker has just registered is
    found by its first request."""

    TTL_S = 2.0
    MAX_ENTRIES = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._specs: dict[tuple[str, str | None], tuple[float, AdapterSpec]] = {}

    def resolve(
        self, session: Session, engine: Engine, ref: str | None, *, owner: str | None = None
    ) -> AdapterSpec | None:
        if ref is None:
            return None
        key, now = (ref, owner), time.monotonic()
        with self._lock:
            hit = self._specs.get(key)
        if hit is not None and now - hit[0] < self.TTL_S:
            return hit[1]
        spec = resolve_adapter(session, engine, ref, owner=owner)
        assert spec is not None
        with self._lock:
            if len(self._specs) >= self.MAX_ENTRIES:
                self._specs.clear()
            self._specs[key] = (now, spec)
        return spec

    def forget(self) -> None:
        with self._lock:
            self._specs.clear()
