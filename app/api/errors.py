"""Domain errors (app.exceptions) as HTTP responses, in one shape: `{"error": {"code", "message",
"field"}}` plus the error's own headers (Retry-After on 503 and 429)."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from app.api.paths import PROBE_PATHS
from app.exceptions import Busy, ServiceError

log = logging.getLogger("gptoss")


def error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.status, headers=exc.headers() or None)


async def send_error(send: Send, exc: ServiceError) -> None:
    """The same response, sent by ASGI middleware that answers before the app runs."""
    body = json.dumps({"error": exc.to_dict()}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in exc.headers().items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _finite(value: Any) -> Any:
    """The request's own NaN or infinity, echoed in the details, as text: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, in our error shape; the message names the field and what was wrong with it."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    field = ".".join(loc) or "body"
    message = f"{field}: {first.get('msg', 'invalid')}"
    details = _finite(jsonable_encoder(exc.errors(), custom_encoder={Exception: str}))
    body = {"code": "invalid_input", "message": message, "field": field, "details": details}
    return JSONResponse({"error": body}, status_code=422)


def install(app: FastAPI) -> None:
    """The exception handlers; called once by create_app."""

    @app.exception_handler(ServiceError)
    async def _service_error(_req: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(SQLAlchemyTimeoutError)
    async def _pool_exhausted(_req: Request, _exc: SQLAlchemyTimeoutError) -> JSONResponse:
        return error_response(Busy("every database connection is in use; retry after 1 s", retry_after=1))

    @app.exception_handler(OperationalError)
    async def _database_busy(_req: Request, exc: OperationalError) -> JSONResponse:
        # "database is locked" past busy_timeout, or a database server that went away: both pass.
        log.warning("database error answered as 503: %s", exc.orig)
        return error_response(Busy("the database is busy or unreachable; retry after 2 s", retry_after=2))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {"code": f"http_{exc.status_code}", "message": str(exc.detail), "field": None}
        return JSONResponse({"error": body}, status_code=exc.status_code, headers=exc.headers)


# --- the errors in the OpenAPI document -------------------------------------------------------------

_WHY = {
    400: "Invalid request (the OpenAI routes' word for 422); `param` names the field.",
    401: "No API key, or an unknown or revoked one.",
    403: "The API key lacks this route's scope.",
    404: "No such object, or one that belongs to another API key (the same answer).",
    409: "The object's state does not allow it (e.g. a job already finished, a file in use, an "
    "Idempotency-Key reused for another request, an adapter of another base model).",
    413: "The body is over max_request_bytes (max_upload_bytes for uploads).",
    422: "A field is missing, out of range or malformed; the error names it and the limit.",
    429: "This API key (or address) is over its rate limit or its requests in flight; see Retry-After.",
    503: "The server is at capacity, the database is busy, or the model is not loaded; see Retry-After.",
}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
}
_STREAMING_PATHS = {"/generate", "/v1/chat/completions"}
_SSE_EVENT = {
    "type": "object",
    "description": "With `stream: true`: server-sent events, each `data` a JSON object (deltas, then "
    "the final one; the route's text says which).",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}


def _statuses(path: str, method: str, operation: dict[str, Any]) -> list[int]:
    """The error statuses an operation can answer: from the middleware and auth (every route with a
    key), validation, the body size limit, look-ups and state conflicts."""
    found = [401, 403, 422, 429, 503]
    if "requestBody" in operation:
        found.append(413)
    if "{" in path or method == "post":
        found.append(404)
    if method in ("post", "delete"):
        found.append(409)
    if path.startswith("/v1/"):
        found.append(400)
    return sorted(found)


def document_errors(app: FastAPI) -> None:
    """Make /openapi.json list every error status each route can answer, with the error body's shape
    (the native one; the /v1 routes answer OpenAI's, or the native one from the middleware), and the
    event-stream answer of the streaming routes. Called once by create_app, after the routers."""
    from app.schemas import ErrorResponse, OpenAIErrorResponse

    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ErrorResponse, OpenAIErrorResponse):
            found = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(found.pop("$defs", {}))
            components[model.__name__] = found
        native = {"$ref": "#/components/schemas/ErrorResponse"}
        either = {"anyOf": [native, {"$ref": "#/components/schemas/OpenAIErrorResponse"}]}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                if path in PROBE_PATHS:  # they answer without a key and are never shed
                    continue
                body = either if path.startswith("/v1/") else native
                responses = operation.setdefault("responses", {})
                for status in _statuses(path, method, operation):
                    answer: dict[str, Any] = {
                        "description": _WHY[status],
                        "content": {"application/json": {"schema": body}},
                    }
                    if status in (429, 503):
                        answer["headers"] = _RETRY_AFTER
                    responses[str(status)] = answer
                if path in _STREAMING_PATHS:
                    ok = responses.setdefault("200", {"description": "OK"}).setdefault("content", {})
                    ok["text/event-stream"] = {"schema": _SSE_EVENT}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
