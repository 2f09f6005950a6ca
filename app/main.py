"""create_app(settings) and its lifespan; nothing else. Run with `uvicorn --factory app.main:app_from_env`."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.ml.modeling import import_unsloth_first

# Unsloth patches transformers only when imported first; the routes and the engine import transformers.
if os.environ.get("GPTOSS_BACKEND", "auto").strip().lower() != "hf":
    import_unsloth_first()  # a no-op without CUDA or without the unsloth package

from app import observability  # noqa: E402
from app.api.routes import adapters, files, generate, health, jobs, openai_compat, openai_ft, plots
from app.config import Settings, get_settings
from app.db import make_engine, make_sessionmaker, upgrade_to_head
from app.exceptions import Busy, ServiceError
from app.inference.engine import create_engine

log = logging.getLogger("app")

DESCRIPTION = """LoRA fine-tuning and serving for gpt-oss-20b on your own GPU.

Upload a JSONL dataset (`POST /files`), start a job (`POST /jobs`), poll it (`GET /jobs/{id}`),
then generate with the adapter it produced (`POST /generate`, or the OpenAI-compatible `/v1`).
Every route but `/healthz` and `/readyz` needs `Authorization: Bearer <key>`."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    upgrade_to_head(settings)  # also run by every worker; a file lock serialises them
    if settings.auth == "none":
        log.warning(
            "!!! GPTOSS_AUTH=none: API keys are OFF, anyone who reaches %s:%s can train and generate. "
            "Use this only on a machine nobody else can reach. !!!",
            settings.host,
            settings.port,
        )
    engine = create_engine(settings)
    app.state.engine = engine
    if settings.load_model_on_start:
        engine.start()
    try:
        yield
    finally:
        engine.close()
        app.state.db.dispose()


def _error_response(exc: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else None
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.status, headers=headers)


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, in our error shape; the message names the field and what was wrong with it."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    field = ".".join(loc) or "body"
    message = f"{field}: {first.get('msg', 'invalid')}"
    body = {"code": "invalid_input", "message": message, "field": field, "details": jsonable(exc.errors())}
    return JSONResponse({"error": body}, status_code=422)


def jsonable(errors: object) -> object:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(errors, custom_encoder={Exception: str})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_req: Request, exc: ServiceError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {"code": f"http_{exc.status_code}", "message": str(exc.detail), "field": None}
        return JSONResponse({"error": body}, status_code=exc.status_code, headers=exc.headers)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="gpt-oss tuner", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.db = make_engine(settings)
    app.state.sessionmaker = make_sessionmaker(app.state.db)
    app.state.write_sessionmaker = make_sessionmaker(app.state.db, immediate=True)
    _install_error_handlers(app)
    for module in (health, files, jobs, adapters, generate, openai_compat, openai_ft, plots):
        app.include_router(module.router)
    observability.install(app, settings)
    return app


def app_from_env() -> FastAPI:
    """For `uvicorn app.main:app_from_env --factory`."""
    return create_app(get_settings())
