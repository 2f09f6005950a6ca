"""Liveness and readiness probes; the only routes without auth."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.paths import HEALTHZ, READYZ
from app.db import current_revision, head_revision

router = APIRouter(tags=["health"])


@router.get(HEALTHZ)
def healthz() -> dict[str, str]:
    """The process is up and serving HTTP."""
    return {"status": "ok"}


@router.get(READYZ, responses={503: {"description": "Some check failed; the body says which."}})
def readyz(request: Request) -> JSONResponse:
    """Ready: the database answers, its schema is at the newest migration, the base model is loaded."""
    checks = {"database": _database(request), "migrations": _migrations(request), "model": _model(request)}
    ready = all(check["ok"] for check in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503
    )


def _database(request: Request) -> dict[str, Any]:
    try:
        with request.app.state.db.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means "not ready", reported, not raised
        return {"ok": False, "detail": str(exc)}
    return {"ok": True}


def _migrations(request: Request) -> dict[str, Any]:
    try:
        current, head = current_revision(request.app.state.db), head_revision()
    except Exception as exc:
        return {"ok": False, "detail": str(exc)}
    return {"ok": current == head, "current": current, "head": head}


def _model(request: Request) -> dict[str, Any]:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        return {"ok": False, "detail": "the inference engine has not started"}
    if not request.app.state.settings.load_model_on_start:
        return {"ok": True, "detail": "load_model_on_start is off; the base loads on first use"}
    return {"ok": bool(engine.is_ready())}
