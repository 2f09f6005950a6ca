"""OpenAI-compatible routes, so the official `openai` client works unchanged against this server.

`model` is the base model's id or an adapter's name (or id). Reasoning comes back in
`reasoning_content` on the message (and on stream deltas), beside `content`. Errors use OpenAI's
body shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from app.api.deps import (
    AdapterLookup,
    GenerateKey,
    SessionDep,
    SettingsDep,
    generate_scope,
    owner_of,
)
from app.api.metrics import observe_generation
from app.exceptions import InvalidInput, NotFound, ServiceError
from app.inference import service
from app.inference.base import Engine
from app.inference.schemas import ChatCompletionRequest, OpenAIMessage
from app.inference.stream import Assembler, Completion
from app.inference.types import AdapterSpec, SamplingParams

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def openai_error(exc: ServiceError) -> JSONResponse:
    return JSONResponse(_error_body(exc), status_code=exc.status, headers=exc.headers())


def _error_body(exc: ServiceError) -> dict[str, Any]:
    return {
        "error": {
            "message": exc.message,
            "type": _ERROR_TYPES.get(
                exc.status, "server_error" if exc.status >= 500 else "invalid_request_error"
            ),
            "param": exc.field,
            "code": "model_not_found" if isinstance(exc, NotFound) and exc.field == "model" else exc.code,
        }
    }


def _validation_error(exc: RequestValidationError) -> InvalidInput:
    first = exc.errors()[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "body"
    return InvalidInput(field, str(first.get("msg", "invalid value")))


class OpenAIRoute(APIRoute):
    """Answers every error of these routes (auth and validation included) in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                return openai_error(exc)
            except RequestValidationError as exc:
                return openai_error(_validation_error(exc))

        return wrapped


router = APIRouter(
    prefix="/v1", tags=["openai"], route_class=OpenAIRoute, dependencies=[Depends(generate_scope)]
)


@router.get("/models")
async def list_models(request: Request, session: SessionDep, key: GenerateKey) -> dict[str, Any]:
    """The base model and every adapter, as OpenAI model objects."""
    from app.registry import list_adapters

    base = request.app.state.engine.base_model_id
    data = [{"id": base, "object": "model", "created": 0, "owned_by": "base"}]
    after: str | None = None
    while True:
        page = list_adapters(session, after=after, limit=100, owner=owner_of(key))
        data += [_model_object(a.name, unix_time(a.created_at), base) for a in page.rows]
        if not page.has_more:
            break
        after = page.next_cursor
    return {"object": "list", "data": data}


def unix_time(moment: datetime) -> int:
    """Seconds since the epoch. SQLite hands the stored UTC times back naive, and a naive datetime's
    .timestamp() would read them as the server's local time."""
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return int(aware.timestamp())


def _model_object(name: str, created: float, base: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "adapter", "root": base}


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: GenerateKey,
) -> dict[str, Any] | StreamingResponse:
    """Chat completion with `reasoning_effort` honoured and the reasoning in `reasoning_content`."""
    engine = await service.ready_engine(request.app.state.engine)
    wanted = body.max_completion_tokens or body.max_tokens or settings.max_new_tokens_cap
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    prepared = service.Prepared(
        prompt_ids=service.render(
            _chat(body.messages), developer=None, reasoning_effort=body.reasoning_effort, settings=settings
        ),
        params=SamplingParams(
            max_new_tokens=service.check_max_new_tokens(wanted, settings, field),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        ),
        adapter=_adapter_for_model(request.app.state.adapters, session, engine, body.model, owner_of(key)),
        stop=list(body.stop or []),
    )
    session.close()  # release the connection before the (long) generation
    assembler = service.start(engine, prepared, observe_generation)
    meta = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": body.model}
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_chunks(assembler, meta, include_usage), media_type="text/event-stream")
    await service.run_to_end(assembler)
    assert assembler.completion is not None
    return _completion_body(assembler.completion, meta)


def _adapter_for_model(
    adapters: AdapterLookup, session: Session, engine: Engine, model: str, owner: str | None
) -> AdapterSpec | None:
    if model == engine.base_model_id:
        return None
    try:
        return adapters.resolve(session, engine, model, owner=owner)
    except NotFound:
        raise NotFound(
            f"model {model!r} does not exist; GET /v1/models lists the base and every adapter", field="model"
        ) from None


def _chat(messages: list[OpenAIMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as harmony turns: system/developer become developer instructions."""
    out = []
    for i, msg in enumerate(messages):
        if msg.role not in ("user", "assistant", "system", "developer"):
            raise InvalidInput(
                f"messages[{i}].role", f"must be one of user, assistant, system, developer; got {msg.role!r}"
            )
        out.append({"role": msg.role, "content": _text(msg.content, i), "thinking": msg.reasoning_content})
    return out


def _text(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if any(part.get("type") != "text" for part in content):
        raise InvalidInput(f"messages[{index}].content", "only text parts are supported")
    return "".join(str(part.get("text", "")) for part in content)


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(done: Completion) -> dict[str, int]:
    total = done.prompt_tokens + done.completion_tokens
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": total,
    }


def _completion_body(done: Completion, meta: dict[str, Any]) -> dict[str, Any]:
    message = {"role": "assistant", "content": done.content, "reasoning_content": done.reasoning}
    choice = {"index": 0, "message": message, "finish_reason": _finish(done.finish_reason), "logprobs": None}
    return {**meta, "object": "chat.completion", "choices": [choice], "usage": _usage(done)}


def _chunk(meta: dict[str, Any], delta: dict[str, Any], finish: str | None = None) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    return f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"


async def _chunks(assembler: Assembler, meta: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    yield _chunk(meta, {"role": "assistant", "content": ""})
    try:
        async for delta in assembler.deltas():
            key = "reasoning_content" if delta.kind == "reasoning" else "content"
            yield _chunk(meta, {key: delta.text})
    except Exception as exc:  # headers are sent: the error travels as the last event, as OpenAI does
        error = (
            exc if isinstance(exc, ServiceError) else ServiceError("generation failed; see the server log")
        )
        yield f"data: {json.dumps(_error_body(error))}\n\n"
        return
    done = assembler.completion
    assert done is not None
    yield _chunk(meta, {}, _finish(done.finish_reason))
    if include_usage:
        usage = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(done)}
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"
