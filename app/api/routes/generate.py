"""POST /generate: one harmony completion from the base model or a LoRA adapter."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from app.api.deps import GenerateKey, SessionDep, SettingsDep, generate_scope, owner_of
from app.api.metrics import observe_generation
from app.exceptions import ServiceError
from app.inference import service
from app.inference.schemas import GenerateRequest, GenerateResponse, Usage
from app.inference.stream import Assembler
from app.inference.types import SamplingParams

router = APIRouter(tags=["generate"], dependencies=[Depends(generate_scope)])


@router.post("/generate", response_model=GenerateResponse)
async def generate(
    body: GenerateRequest, request: Request, session: SessionDep, settings: SettingsDep, key: GenerateKey
) -> GenerateResponse | StreamingResponse:
    """Generate a reply; `stream: true` answers with server-sent events (deltas, then a done event)."""
    engine = await service.ready_engine(request.app.state.engine)
    prepared = service.Prepared(
        prompt_ids=service.render(
            body.chat(), developer=body.developer, reasoning_effort=body.reasoning_effort, settings=settings
        ),
        params=SamplingParams(
            max_new_tokens=service.check_max_new_tokens(body.max_new_tokens, settings),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        ),
        adapter=request.app.state.adapters.resolve(session, engine, body.adapter, owner=owner_of(key)),
        stop=list(body.stop or []),
    )
    session.close()  # release the connection before the (long) generation
    assembler = service.start(engine, prepared, observe_generation)
    meta = {"id": f"gen_{secrets.token_hex(12)}", "model": engine.base_model_id, "adapter": _name(prepared)}
    if body.stream:
        return StreamingResponse(_events(assembler, meta), media_type="text/event-stream")
    await service.run_to_end(assembler)
    return _response(assembler, meta)


def _name(prepared: service.Prepared) -> str | None:
    return prepared.adapter.name if prepared.adapter else None


def _response(assembler: Assembler, meta: dict[str, str | None]) -> GenerateResponse:
    done = assembler.completion
    assert done is not None
    return GenerateResponse(
        id=str(meta["id"]),
        model=str(meta["model"]),
        adapter=meta["adapter"],
        reasoning=done.reasoning,
        content=done.content,
        finish_reason=done.finish_reason,
        usage=Usage(
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            total_tokens=done.prompt_tokens + done.completion_tokens,
        ),
        timings=done.timings,
    )


def _sse(payload: dict[str, object]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _events(assembler: Assembler, meta: dict[str, str | None]) -> AsyncIterator[str]:
    """`{"type": "delta", "kind": "reasoning"|"content", "text"}` events, then `{"type": "done", ...}`
    carrying the same body a non-streamed call returns (or `{"type": "error", "error": {...}}`)."""
    try:
        async for delta in assembler.deltas():
            yield _sse({"type": "delta", "kind": delta.kind, "text": delta.text})
    except Exception as exc:  # the status line is sent already: report the error as the last event
        error = (
            exc if isinstance(exc, ServiceError) else ServiceError("generation failed; see the server log")
        )
        yield _sse({"type": "error", "error": error.to_dict()})
        return
    yield _sse({"type": "done", **_response(assembler, meta).model_dump()})
