"""Operating the service: /metrics, the body and rate limits, request ids, JSON logs, the loss plot.

Each test builds the real app (create_app, its lifespan migrates a real SQLite file) and talks to it
through Starlette's TestClient. Jobs are moved with the real app.queue functions a worker uses, so
the metrics and the plot read exactly what training would have written.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app import queue
from app.api.metrics import observe_generation
from app.api.ratelimit import RateLimiter
from app.config import Settings
from app.logs import configure_logging, log_context
from app.main import create_app

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def ops_settings(settings: Settings) -> Settings:
    # No base model: these tests never generate, and loading it would only cost time.
    return settings.model_copy(
        update={"load_model_on_start": False, "max_request_bytes": 1024, "max_upload_bytes": 4096}
    )


@pytest.fixture
def client(ops_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(ops_settings)) as test_client:
        yield test_client


def _start_job(client: TestClient, worker: str = "w-test") -> str:
    """A queued job, claimed by `worker` as the worker loop would claim it."""
    app: Any = client.app
    with app.state.sessionmaker() as session:
        new = queue.NewJob(base_model="tiny-gpt-oss", dataset="sample:test", file_id=None, config={})
        job, _ = queue.create_job(session, new)
    claimed = queue.claim_next(app.state.db, worker, lease_s=60)
    assert claimed is not None and claimed.id == job.id
    return job.id


def _record_steps(client: TestClient, job_id: str, losses: list[float], worker: str = "w-test") -> None:
    app: Any = client.app
    with app.state.sessionmaker() as session:
        for step, loss in enumerate(losses, start=1):
            metrics = {"step": step, "total_steps": len(losses), "train_loss": loss, "tokens_per_s": 250.0}
            assert queue.record_step(session, job_id, worker, 1, metrics)


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page, by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# --- /metrics -----------------------------------------------------------------------------------------


def test_metrics_expose_jobs_queue_training_and_generation(client: TestClient) -> None:
    app: Any = client.app
    running = _start_job(client)
    _record_steps(client, running, [2.0, 1.5])
    finished = _start_job(client, worker="w-2")
    with app.state.sessionmaker() as session:
        queue.finish_succeeded(session, finished, "w-2", adapter_id="adp_test", backend="hf")
        waiting = queue.NewJob(base_model="tiny-gpt-oss", dataset="sample:test", file_id=None, config={})
        queue.create_job(session, waiting)
    before = _samples(client.get("/metrics").text)
    observe_generation(0.5, 40, "adp_metrics_test")

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    assert _value(samples, "gptoss_jobs", status="queued") == 1
    assert _value(samples, "gptoss_jobs", status="running") == 1
    assert _value(samples, "gptoss_jobs", status="succeeded") == 1
    assert _value(samples, "gptoss_jobs", status="failed") == 0
    assert _value(samples, "gptoss_queue_depth") == 1
    assert _value(samples, "gptoss_training_tokens_per_second") == 250.0
    assert _value(samples, "gptoss_job_duration_seconds_count", status="succeeded") == 1
    assert _value(samples, "gptoss_job_duration_seconds_bucket", status="succeeded", le="+Inf") == 1
    assert _value(samples, "gptoss_loaded_adapters") == 0
    latency = ("gptoss_generate_latency_seconds_count", frozenset({("adapter", "adp_metrics_test")}))
    assert samples[latency] == before.get(latency, 0) + 1
    assert _value(samples, "gptoss_generated_tokens_total", adapter="adp_metrics_test") >= 40
    assert _value(samples, "gptoss_generate_tokens_per_second_sum", adapter="adp_metrics_test") >= 80
    # The scrapes before this one were counted under their route template.
    assert _value(samples, "gptoss_http_requests_total", method="GET", route="/metrics", status="200") >= 1


def test_job_durations_are_bucketed_by_final_status(client: TestClient) -> None:
    """Run times computed from started_at / finished_at (in Python, so any database dialect works)."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.models import Job

    app: Any = client.app
    runs = {"succeeded": [90.0, 4000.0], "failed": [30.0]}
    with app.state.sessionmaker() as session:
        for status, seconds in runs.items():
            for duration in seconds:
                job, _ = queue.create_job(
                    session,
                    queue.NewJob(base_model="tiny-gpt-oss", dataset="sample:test", file_id=None, config={}),
                )
                started = job.created_at
                values = {
                    "status": status,
                    "started_at": started,
                    "finished_at": started + timedelta(seconds=duration),
                }
                session.execute(update(Job).where(Job.id == job.id).values(**values))
        session.commit()

    samples = _samples(client.get("/metrics").text)

    assert _value(samples, "gptoss_job_duration_seconds_count", status="succeeded") == 2
    assert _value(samples, "gptoss_job_duration_seconds_sum", status="succeeded") == 4090.0
    assert _value(samples, "gptoss_job_duration_seconds_bucket", status="succeeded", le="60.0") == 0
    assert _value(samples, "gptoss_job_duration_seconds_bucket", status="succeeded", le="300.0") == 1
    assert _value(samples, "gptoss_job_duration_seconds_bucket", status="succeeded", le="3600.0") == 1
    assert _value(samples, "gptoss_job_duration_seconds_bucket", status="succeeded", le="7200.0") == 2
    assert _value(samples, "gptoss_job_duration_seconds_bucket", status="failed", le="60.0") == 1
    assert _value(samples, "gptoss_job_duration_seconds_sum", status="failed") == 30.0


# --- limits -------------------------------------------------------------------------------------------


def test_body_over_max_request_bytes_is_413_naming_the_limit(client: TestClient) -> None:
    declared = client.post("/jobs", content=b"x" * 2000, headers={"content-type": "application/json"})
    # No Content-Length (chunked): counted as it arrives, stopped at the limit.
    chunked = client.post(
        "/jobs", content=iter([b"{" + b" " * 600, b" " * 600]), headers={"content-type": "application/json"}
    )

    for response in (declared, chunked):
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["code"] == "limit_exceeded"
        assert "max_request_bytes (1024 bytes)" in error["message"]
        assert "GPTOSS_MAX_REQUEST_BYTES" in error["message"]


def test_small_body_passes_the_limit(client: TestClient) -> None:
    response = client.post("/jobs", json={"dataset": ""})

    assert response.status_code == 422  # reached the route's own validation, not the body limit
    assert response.json()["error"]["field"] == "dataset"


def test_uploads_have_their_own_larger_limit(client: TestClient) -> None:
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    row = json.dumps({"messages": chat})
    dataset = ("\n".join([row] * 40) + "\n").encode()  # over max_request_bytes, under max_upload_bytes
    assert 1024 < len(dataset) < 4096

    ok = client.post("/files", files={"file": ("chat.jsonl", dataset)})
    too_large = client.post("/files", files={"file": ("big.jsonl", b"x" * 200_000)})

    assert ok.status_code == 201, ok.text
    assert too_large.status_code == 413
    assert "max_upload_bytes (4096 bytes)" in too_large.json()["error"]["message"]


def test_rate_limit_answers_429_with_retry_after(ops_settings: Settings) -> None:
    app = create_app(ops_settings.model_copy(update={"rate_limit_per_minute": 3}))
    with TestClient(app) as client:
        allowed = [client.get("/jobs").status_code for _ in range(3)]
        limited = client.get("/jobs")
        other_key = client.get("/jobs", headers={"Authorization": "Bearer another-key"})
        health = client.get("/healthz")

    assert allowed == [200, 200, 200]
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 20  # one request per 20 s refills at 3/min
    assert limited.json()["error"]["code"] == "rate_limited"
    assert "3 requests per minute" in limited.json()["error"]["message"]
    assert other_key.status_code == 200  # buckets are per key
    assert health.status_code == 200  # probes are never throttled


def test_rate_limiter_refills_over_the_minute() -> None:
    # A fake clock: waiting out a real minute would be most of this file's time budget.
    now = [1000.0]
    limiter = RateLimiter(60, clock=lambda: now[0])

    assert all(limiter.acquire("k") == 0 for _ in range(60))
    assert limiter.acquire("k") == pytest.approx(1.0)
    now[0] += 0.5
    assert limiter.acquire("k") == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.acquire("k") == 0
    assert limiter.acquire("other") == 0


# --- request ids and logs -----------------------------------------------------------------------------


def test_request_id_is_echoed_or_made(client: TestClient) -> None:
    echoed = client.get("/healthz", headers={"X-Request-ID": "trace-42.a"})
    made = client.get("/healthz")
    forged = client.get("/healthz", headers={"X-Request-ID": "x" * 300})
    limited = client.post("/jobs", content=b"x" * 2000, headers={"X-Request-ID": "big-1"})

    assert echoed.headers["x-request-id"] == "trace-42.a"
    assert len(made.headers["x-request-id"]) == 32
    assert forged.headers["x-request-id"] != "x" * 300  # too long to trust: replaced
    assert limited.headers["x-request-id"] == "big-1"  # also on answers the middleware gives itself


def test_log_lines_are_json_with_request_and_job_ids(ops_settings: Settings) -> None:
    json_settings = ops_settings.model_copy(update={"log_json": True})
    buffer = io.StringIO()
    with TestClient(create_app(json_settings)) as client:
        configure_logging(json_settings, stream=buffer)  # after install(), which logs to stderr
        client.get("/jobs", headers={"X-Request-ID": "req-7"})
        with log_context(job_id="ftjob_123"):
            logging.getLogger("workers.worker").info("step %d done", 5, extra={"loss": 1.25})

    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    access = [e for e in lines if e["logger"] == "gptoss.access" and e.get("request_id") == "req-7"]
    assert len(access) == 1
    assert access[0]["path"] == "/jobs" and access[0]["status"] == 200 and access[0]["level"] == "INFO"
    job_line = next(e for e in lines if e["logger"] == "workers.worker")
    assert job_line == {**job_line, "msg": "step 5 done", "job_id": "ftjob_123", "loss": 1.25}
    assert "request_id" not in job_line


# --- the loss plot ------------------------------------------------------------------------------------


def test_loss_png_is_a_real_png_of_the_job(client: TestClient) -> None:
    job_id = _start_job(client)
    _record_steps(client, job_id, [3.0, 2.5, 2.1, 1.8, 1.6])

    response = client.get(f"/jobs/{job_id}/loss.png")

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["cache-control"] == "no-store"
    assert response.content.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(response.content))
    assert image.size == (800, 450)
    assert len(image.convert("RGB").getcolors(maxcolors=100_000) or []) > 10  # a drawn curve, not a blank


def test_loss_png_of_a_job_without_steps_and_of_no_job(client: TestClient) -> None:
    job_id = _start_job(client)

    empty = client.get(f"/jobs/{job_id}/loss.png")
    missing = client.get("/jobs/ftjob_nope/loss.png")

    assert empty.status_code == 200 and empty.content.startswith(PNG_SIGNATURE)
    assert missing.status_code == 404
    assert missing.json()["error"]["field"] == "job_id"


def test_gpu_memory_series_when_cuda_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in for torch.cuda: there is no GPU here (CI has none either). It answers as torch's
    # API does, so this checks which series a GPU host gets and from which calls.
    from types import SimpleNamespace

    from app.api.metrics import _gpu_memory

    cuda = SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: 2,
        mem_get_info=lambda i: (30 * 2**30, 80 * 2**30),
        memory_allocated=lambda i: (i + 1) * 2**30,
        memory_reserved=lambda i: (i + 2) * 2**30,
    )
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))

    samples = {(s.name, s.labels["device"]): s.value for family in _gpu_memory() for s in family.samples}

    assert samples[("gptoss_gpu_memory_used_bytes", "1")] == 50 * 2**30
    assert samples[("gptoss_gpu_memory_total_bytes", "0")] == 80 * 2**30
    assert samples[("gptoss_gpu_memory_allocated_bytes", "1")] == 2 * 2**30
    assert samples[("gptoss_gpu_memory_reserved_bytes", "0")] == 2 * 2**30


def test_json_logs_silence_progress_bars(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tqdm bar (model loading, downloads) would put non-JSON text between the JSON lines.
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    try:
        configure_logging(settings.model_copy(update={"log_json": True}), stream=io.StringIO())
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # inherited by the training process
        assert are_progress_bars_disabled() and not hf_logging.is_progress_bar_enabled()
    finally:
        os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)  # else the hub refuses to re-enable them
        enable_progress_bars()
        hf_logging.enable_progress_bar()
        configure_logging(settings)
