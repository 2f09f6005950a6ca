"""The API as deployed: `uvicorn app.main:app_from_env --factory` in its own process, configured by
GPTOSS_* variables, spoken to over real HTTP. Its stderr must be JSON lines only, uvicorn's own
included, with the request id of each request on its access line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(url: str, process: subprocess.Popen[bytes], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the API process exited during start-up"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    pytest.fail("the API did not answer /healthz in time")


@pytest.fixture
def served(settings: Settings, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, stderr log file) of a running API; stopped with SIGINT, as Ctrl-C would."""
    port = _free_port()
    env = {
        **os.environ,
        "GPTOSS_DATA_DIR": str(settings.data_dir),
        "GPTOSS_MODELS_DIR": str(settings.models_path),
        "GPTOSS_AUTH": "none",
        "GPTOSS_LOAD_MODEL_ON_START": "false",  # only time here; quiet model loading is tested in-process
        "GPTOSS_LOG_JSON": "true",
        "GPTOSS_RATE_LIMIT_PER_MINUTE": "2",
    }
    log_path = tmp_path / "api.stderr"
    command = [sys.executable, "-m", "uvicorn", "app.main:app_from_env", "--factory", "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stderr=log, stdout=log, cwd=tmp_path)
        try:
            _wait_until_up(f"http://127.0.0.1:{port}", process)
            yield f"http://127.0.0.1:{port}", log_path
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # never leave a server behind
                process.kill()
                process.wait()
                raise


def _log_lines(path: Path) -> list[dict[str, Any]]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a log line that is not JSON: {line!r}")
    return parsed


def test_served_api_logs_json_lines_with_request_ids(served: tuple[str, Path]) -> None:
    url, log_path = served
    with httpx.Client(base_url=url) as http:
        first = http.get("/jobs", headers={"X-Request-ID": "srv-1"})
        second = http.get("/jobs")  # /healthz polls are exempt: this is the second counted request
        third = http.get("/jobs", headers={"X-Request-ID": "srv-3"})
        metrics = http.get("/metrics")

    assert first.status_code == 200 and first.headers["x-request-id"] == "srv-1"
    assert second.status_code == 200 and len(second.headers["x-request-id"]) == 32
    assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
    assert third.headers["x-request-id"] == "srv-3"
    assert "gptoss_queue_depth 0.0" in metrics.text
    time.sleep(0.2)  # let the last access lines reach the file
    lines = _log_lines(log_path)
    assert all({"ts", "level", "logger", "msg"} <= set(entry) for entry in lines)
    access = {e.get("request_id"): e for e in lines if e["logger"] == "gptoss.access"}
    assert access["srv-1"]["status"] == 200 and access["srv-1"]["path"] == "/jobs"
    assert access["srv-3"]["status"] == 429
    assert any(e["logger"].startswith("uvicorn") for e in lines), "uvicorn's own lines go through us too"


@pytest.mark.parametrize(("backend", "imported"), [("auto", True), ("hf", False)])
def test_the_api_imports_unsloth_before_transformers_unless_told_hf(backend: str, imported: bool) -> None:
    """The API process (uvicorn app.main:app_from_env) serves with Unsloth where it can: Unsloth must be
    imported before the routes and the engine import transformers (the H200 run warned it was not)."""
    from tests.fixtures_ml import probe_unsloth_import_order

    seen = probe_unsloth_import_order("import app.main\n", env={"GPTOSS_BACKEND": backend})
    if imported:
        assert seen == {"transformers_already_imported": False}
    else:
        assert seen == {}  # GPTOSS_BACKEND=hf: Unsloth is never imported
