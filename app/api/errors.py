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
