"""Trained adapters: list, inspect (the manifest), delete."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from app import adapter_folder, registry
from app.api.deps import ReadKey, SessionDep, TrainKey, WriteSessionDep, owner_of
from app.models import Adapter
from app.schemas import AdapterPublic, Deleted, Page

router = APIRouter(prefix="/adapters", tags=["adapters"])


@router.get("", response_model=Page[AdapterPublic])
def list_adapters(
    session: SessionDep,
    _key: ReadKey,
    after: Annotated[str | None, Query(description="Last id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    """Adapters, newest first."""
    return registry.list_adapters(session, after=after, limit=limit, owner=owner_of(_key)).as_page()


@router.get("/{ref}", response_model=AdapterPublic)
def get_adapter(ref: str, session: SessionDep, _key: ReadKey) -> Adapter:
    """One adapter by id or name: base and fingerprint, targets, hyperparameters, metrics, source job."""
    return registry.find_adapter(session, ref, owner=owner_of(_key))


@router.delete("/{ref}", response_model=Deleted)
def delete_adapter(ref: str, request: Request, session: WriteSessionDep, _key: TrainKey) -> Deleted:
    """Unload the adapter from the inference engine, then delete its row and its files."""
    adapter = registry.find_adapter(session, ref, owner=owner_of(_key))
    adapter_id, path = adapter.id, adapter.path
    engine = getattr(request.app.state, "engine", None)
    if engine is not None:
        engine.unload(adapter_id)
    session.delete(adapter)
    session.commit()
    request.app.state.adapters.forget()  # the generation routes' remembered lookups (AdapterLookup)
    if engine is not None:
        engine.unload(
            adapter_id
        )  # again: a request between the first unload and the delete may have loaded it
    adapter_folder.delete(Path(path))
    return Deleted(id=adapter_id, object="adapter")
