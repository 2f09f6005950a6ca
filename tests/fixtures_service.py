"""Fixtures for the service tests: the app on a real SQLite file, a real uvicorn server, real worker
processes, and small training configs so each real job takes seconds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

ROOT = Path(__file__).resolve().parent.parent

# Few steps, short rows, attention-only LoRA: the expert LoRA builds a full delta per expert on every
# forward (see FACTS.md), which the end-to-end tests do not need to prove the service works.
SMALL_TRAINING: dict[str, Any] = {
    "max_steps": 4,
    "save_steps": 4,
    "gradient_accumulation_steps": 1,
    "per_device_train_batch_size": 1,
    "warmup_steps": 0,
    "max_seq_length": 256,
    "target_parameters": [],
    "logging_steps": 1,
}


@pytest.fixture
def svc_settings(settings: Settings) -> Settings:
    """The shared test settings without loading a base model in the API (these tests never generate)."""
    return settings.model_copy(update={"load_model_on_start": False, "log_json": False})


@pytest.fixture
def svc_client(svc_settings: Settings) -> Iterator[TestClient]:
    """The real app (its lifespan migrates the test's own SQLite file) through Starlette's TestClient."""
    with TestClient(create_app(svc_settings)) as test_client:
        yield test_client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def svc_server(svc_settings: Settings) -> Iterator[str]:
    """uvicorn serving create_app(settings) on a free 127.0.0.1 port; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(svc_settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def worker_env(settings: Settings, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GPTOSS_DATA_DIR=str(settings.data_dir),
        GPTOSS_DATABASE_URL=settings.db_url,
        GPTOSS_MODELS_DIR=str(settings.models_path),
        GPTOSS_BASE_MODEL=settings.base_model,
        GPTOSS_BACKEND=settings.backend,
        GPTOSS_AUTH="none",
        GPTOSS_LOG_JSON="false",
        GPTOSS_WORKER_POLL_S="0.2",
        GPTOSS_HEARTBEAT_S="0.5",
        GPTOSS_LEASE_S="30",
        PYTHONPATH=str(ROOT),
    )
    env.update(overrides)
    return env


StartWorker = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def start_worker(svc_settings: Settings, tmp_path: Path) -> Iterator[StartWorker]:
    """Start `python -m workers.worker` as a real process; every one still running is killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, **env: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"worker-{len(procs)}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.worker", *args],
            cwd=ROOT,
            env=worker_env(svc_settings, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


def wait_for(predicate: Callable[[], Any], timeout: float = 120, what: str = "condition") -> Any:
    """Poll until `predicate()` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def job_status(http: httpx.Client | TestClient, job_id: str) -> dict[str, Any]:
    response = http.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_status(
    http: httpx.Client | TestClient, job_id: str, *statuses: str, timeout: float = 150
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = job_status(http, job_id)
        return job if job["status"] in statuses else None

    result: dict[str, Any] = wait_for(reached, timeout, f"job {job_id} to reach {statuses}")
    return result


def all_events(http: httpx.Client | TestClient, job_id: str, kind: str | None = None) -> list[dict[str, Any]]:
    """Every event of a job, following the cursor page by page."""
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        params: dict[str, Any] = {"after": after, "limit": 5}  # small pages: the cursor gets exercised
        if kind:
            params["kind"] = kind
        page = http.get(f"/jobs/{job_id}/events", params=params).json()
        events += page["data"]
        if not page["has_more"]:
            return events
        after = int(page["next_cursor"])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as dead.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False
