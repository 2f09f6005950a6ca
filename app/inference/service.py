"""The steps both generation APIs share: check the request against the limits, resolve the adapter,
render the harmony prompt and queue it on the engine."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from sqlalchemy.orm import Session

from app.config import Settings
from app.exceptions import InvalidInput, ServiceError
from app.inference.engine import InferenceEngine
from app.inference.schemas import DEFAULT_MAX_NEW_TOKENS
from app.inference.stream import Assembler, Completion, TokenStream
from app.inference.types import AdapterSpec, SamplingParams


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterSpec | None
    stop: list[str]


async def ready_engine(request: Request) -> InferenceEngine:
    """The app's engine, loading the base on first use when it was not loaded at start."""
    engine: InferenceEngine = request.app.state.engine
    if not engine.is_ready():
        await asyncio.to_thread(engine.start)
    return engine


def resolve_adapter(session: Session, engine: InferenceEngine, ref: str | None) -> AdapterSpec | None:
    """The registry row for `ref` (id or name): NotFound 404, or Conflict 409 when it is for another base."""
    if ref is None:
        return None
    from app.registry import find_adapter

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


def check_max_new_tokens(value: int | None, settings: Settings, field: str = "max_new_tokens") -> int:
    """The request's limit, or (omitted) the default resolved now against this server's cap."""
    cap = settings.max_new_tokens_cap
    if value is None:
        return min(DEFAULT_MAX_NEW_TOKENS, cap)
    if value > cap:
        raise InvalidInput(field, f"must be at most {cap}; ask for fewer (max_new_tokens_cap)")
    return value


def render(
    messages: list[dict[str, Any]], *, developer: str | None, reasoning_effort: str, settings: Settings
) -> list[int]:
    from app.ml.harmony import render_prompt

    try:
        ids = render_prompt(messages, developer=developer, reasoning_effort=reasoning_effort)
    except ValueError as exc:  # the renderer names the bad field
        raise InvalidInput("messages", str(exc)) from exc
    limit = settings.max_prompt_tokens
    if len(ids) > limit:
        raise InvalidInput(
            "messages", f"the prompt is {len(ids)} tokens; at most {limit} are allowed (max_prompt_tokens)"
        )
    return ids


def start(engine: InferenceEngine, prepared: Prepared) -> Assembler:
    """Queue the request (Busy 503 when the engine is full) and return its assembler."""
    stream = TokenStream()
    engine.submit(prepared.prompt_ids, prepared.params, stream, prepared.adapter)
    adapter = prepared.adapter.name if prepared.adapter else None
    return Assembler(
        stream,
        prompt_tokens=len(prepared.prompt_ids),
        stop=prepared.stop,
        on_complete=lambda done: _observe(done, adapter),
    )


def _observe(done: Completion, adapter: str | None) -> None:
    from app.observability import observe_generation

    observe_generation(done.timings["total_ms"] / 1000, done.completion_tokens, adapter)


async def run_to_end(assembler: Assembler) -> Assembler:
    async for _ in assembler.deltas():
        pass
    return assembler


def retry_headers(exc: ServiceError) -> dict[str, str]:
    retry_after = getattr(exc, "retry_after", None)
    return {"Retry-After": str(retry_after)} if retry_after is not None else {}
