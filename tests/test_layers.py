"""Lower layers never import upper ones: the worker needs no web framework, inference needs no
HTTP request and no job table. Each check imports a module in a fresh interpreter (this test
process has imported everything already) and lists what it brought into sys.modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_by(*modules: str) -> set[str]:
    code = f"import json, sys, {', '.join(modules)}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def _top_level(modules: set[str], names: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in names}


def test_the_worker_imports_no_web_framework() -> None:
    modules = _imported_by("workers.worker")
    assert "app.logs" in modules  # it does log through the shared logging module
    assert not _top_level(modules, {"fastapi", "starlette", "prometheus_client"})
    assert not {m for m in modules if m.startswith("app.api")}


def test_inference_imports_neither_http_nor_the_job_table() -> None:
    modules = _imported_by("app.inference.service", "app.inference.engine", "app.inference.vllm_engine")
    assert not _top_level(modules, {"fastapi", "starlette", "prometheus_client", "sqlalchemy"})
    assert not modules & {"app.queue", "app.models", "app.db", "app.registry"}
    assert not {m for m in modules if m.startswith("app.api")}


def test_logging_needs_only_the_standard_library_and_settings() -> None:
    modules = _imported_by("app.logs")
    assert not _top_level(modules, {"fastapi", "starlette", "prometheus_client", "sqlalchemy", "torch"})
    assert not {m for m in modules if m.startswith("app.") and m not in ("app.config", "app.logs")}
