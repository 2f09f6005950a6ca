"""The adapter registry: rows in `adapters`, each pointing at a finished folder under data_dir/adapters.

Files first, then the row: an adapter row only ever points at a complete folder (the trainer renames
the folder into place atomically, and `app.adapter_folder.check_for_registration` checks it before the
row is added), so the inference side never loads a half-written adapter. The folder itself (its
manifest, writing, deleting) belongs to app.adapter_folder.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import adapter_folder
from app.exceptions import Conflict, NotFound
from app.models import Adapter
from app.owners import where_owned
from app.pagination import PageRows, paginate


def find_adapter(session: Session, ref: str, *, owner: str | None = None) -> Adapter:
    """By id (adp_...) or by name, if `owner` may see it (app.owners); NotFound otherwise."""
    query = select(Adapter).where(or_(Adapter.id == ref, Adapter.name == ref))
    adapter = session.scalar(query.where(where_owned(Adapter.api_key_id, owner)))
    if adapter is None:
        raise NotFound(f"adapter {ref!r} does not exist; GET /adapters lists them", field="adapter")
    return adapter


def get_adapter(session: Session, adapter_id: str) -> Adapter | None:
    return session.get(Adapter, adapter_id)


def list_adapters(
    session: Session, *, after: str | None = None, limit: int = 100, owner: str | None = None
) -> PageRows:
    """Newest first; `after` is the last id of the previous page."""
    query = select(Adapter).where(where_owned(Adapter.api_key_id, owner))
    return paginate(session, query, Adapter.id, after=after, limit=limit)


def register_adapter(
    session: Session,
    *,
    adapter_id: str,
    name: str,
    folder: Path,
    job_id: str | None,
    api_key_id: str | None = None,
) -> Adapter:
    """Add the row for a complete adapter folder (idempotent: a retried registration returns the row)."""
    existing = session.get(Adapter, adapter_id)
    if existing is not None:
        return existing
    manifest = adapter_folder.check_for_registration(folder)
    adapter = Adapter(
        id=adapter_id,
        name=name,
        base_model=str(manifest.get("base_model", "")),
        base_fingerprint=manifest.get("base_fingerprint"),
        backend=manifest.get("backend"),
        path=str(folder.resolve()),
        job_id=job_id,
        manifest=manifest,
        api_key_id=api_key_id,
    )
    session.add(adapter)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(
            f"an adapter named {name!r} already exists; pick another suffix", field="suffix"
        ) from None
    return adapter
