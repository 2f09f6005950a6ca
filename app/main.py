"""create_app(settings) and its lifespan; nothing else. Run with `uvicorn --factory app.main:app_from_env`."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from app.ml.modeling import import_unsloth_first

# Unsloth patches transformers only when imported first; the routes and the engine import transformers.
if os.environ.get("GPTOSS_BACKEND", "auto").strip().lower() != "hf":
    import_unsloth_first()  # a no-op without CUDA or without the unsloth package

from app import identity, queue  # noqa: E402
from app.api import errors, metrics, middleware
from app.api.deps import AdapterLookup
from app.api.paths import HEALTHZ, READYZ
from app.api.routes import (
    adapters,
    console,
    docs,
    files,
    generate,
    health,
    jobs,
    openai_compat,
    openai_ft,
    plots,
)
from app.config import Settings, get_settings
from app.db import make_engine, make_sessionmaker, upgrade_to_head
from app.inference.base import create_engine
from app.inference.gpu_release import TrainingProbe
from app.logs import configure_logging

log = logging.getLogger("app")

DESCRIPTION = f"""LoRA fine-tuning and serving for gpt-oss-20b on your own GPU.

Upload a JSONL dataset (`POST /files`), start a job (`POST /jobs`), poll it (`GET /jobs/{{id}}`),
then generate with the adapter it produced (`POST /generate`, or the OpenAI-compatible `/v1`).
Every route but `{HEALTHZ}`, `{READYZ}`, `/metrics`, these docs (`/docs`, `/redoc`, `/openapi.json`) and
the console's page needs `Authorization: Bearer <key>`. Timestamps are UTC, with their offset."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # The thread pool that runs blocking route code; app.db sizes the SQLite pool from the same setting.
    anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
    upgrade_to_head(settings)  # also run by every worker; a migration lock serialises them
    identity.check_data_dir(settings, app.state.db)  # refuses a data folder of another deployment
    if settings.auth == "none":
        log.warning(
            "!!! GPTOSS_AUTH=none: API keys are OFF, anyone who reaches %s:%s can train and generate. "
            "Use this only on a machine nobody else can reach. !!!",
            settings.host,
            settings.port,
        )
    engine = create_engine(settings, training_probe=_training_probe(app))
    app.state.engine = engine
    if settings.load_model_on_start:
        engine.start()
    try:
        yield
    finally:
        engine.close()
        app.state.db.dispose()


def _training_probe(app: FastAPI) -> TrainingProbe:
    """True while a job runs: the worker trains on this host's GPU (release_gpu_during_training)."""

    def probe() -> bool:
        with app.state.sessionmaker() as session:
            return queue.any_job_running(session)

    return probe


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="gpt-oss tuner",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # app.api.routes.docs serves /docs and /redoc with local assets (no CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.adapters = AdapterLookup()
    app.state.db = make_engine(settings)
    app.state.sessionmaker = make_sessionmaker(app.state.db)
    app.state.write_sessionmaker = make_sessionmaker(app.state.db, immediate=True)
    configure_logging(settings)
    errors.install(app)
    for module in (health, files, jobs, adapters, generate, openai_compat, openai_ft, plots, docs, console):
        app.include_router(module.router)
    errors.document_errors(app)
    middleware.install(app, settings)
    metrics.install(app)
    return app


def app_from_env() -> FastAPI:
    """For `uvicorn app.main:app_from_env --factory`."""
    return create_app(get_settings())
