"""The steps both generation APIs share: check the request against the limits, render the harmony
prompt and queue it on the engine. The routes hand in what these steps need (the engine, the
settings, an adapter already resolved from the registry); nothing here knows HTTP or the database."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.config import Settings
from app.exceptions import InvalidInput
from app.inference.base import Engine
from app.inference.schemas import DEFAULT_MAX_NEW_TOKENS
from app.inference.stream import Assembler, Completion, TokenStream
from app.inference.types import AdapterSpec, SamplingParams
from app.ml.harmony import ReasoningEffort

# Told of every finished generation: (seconds, new tokens, adapter name or None for the base).
GenerationObserver = Callable[[float, int, str | None], None]


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterSpec | None
    stop: list[str]


async def ready_engine(engine: Engine) -> Engine:
    """The engine, loading the base on first use when it was not loaded at start."""
    if not engine.is_ready():
        await asyncio.to_thread(engine.start)
    return engine


def check_max_new_tokens(value: int | None, settings: Settings, field: str = "max_new_tokens") -> int:
    """The request's limit, or (omitted) the default resolved now against this server's cap."""
    cap = settings.max_new_tokens_cap
    if value is None:
        return min(DEFAULT_MAX_NEW_TOKENS, cap)
    if value > cap:
        raise InvalidInput(field, f"must be at most {cap}; ask for fewer (max_new_tokens_cap)")
    return value


def render(
    messages: list[dict[str, Any]],
    *,
    developer: str | None,
    reasoning_effort: ReasoningEffort,
    settings: Settings,
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


def start(engine: Engine, prepared: Prepared, observe: GenerationObserver | None = None) -> Assembler:
    """Queue the request (Busy 503 when the engine is full) and return its assembler; `observe` hears
    of the generation when it ends."""
    stream = TokenStream()
    engine.submit(prepared.prompt_ids, prepared.params, stream, prepared.adapter)
    adapter = prepared.adapter.name if prepared.adapter else None
    return Assembler(
        stream,
        prompt_tokens=len(prepared.prompt_ids),
        stop=prepared.stop,
        on_complete=(lambda done: _observe(observe, done, adapter)) if observe else None,
    )


def _observe(observe: GenerationObserver, done: Completion, adapter: str | None) -> None:
    observe(done.timings["total_ms"] / 1000, done.completion_tokens, adapter)


async def run_to_end(assembler: Assembler) -> Assembler:
    async for _ in assembler.deltas():
        pass
    return assembler
