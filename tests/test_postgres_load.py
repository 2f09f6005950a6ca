"""The API on PostgreSQL under a burst: 200 concurrent calls while two workers train, no server error.

Reads and writes mixed (job listings, job and event reads, new jobs, cancels, uploads, /metrics), each
on its own connection at once, against the real app served by uvicorn, while two real worker
processes heartbeat and record steps into the same database. How long the burst took is printed, not
asserted (speed goals belong in bench/).
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.ml.data import SAMPLES_DIR
from tests.fixtures_service import SMALL_TRAINING, StartWorker, job_status, wait_for, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)]

CALLS = 200


@pytest.fixture
def svc_settings(settings: Settings) -> Settings:
    """Load shedding off for this burst (all calls come from one client, which past its share would get
    a fast 429; tests/test_api_load.py covers that): every call reaches the database."""
    return settings.model_copy(
        update={
            "load_model_on_start": False,
            "log_json": False,
            "max_requests_in_flight": CALLS,
            "max_requests_in_flight_per_client": CALLS,
        }
    )


TRAINING = {**SMALL_TRAINING, "max_steps": 400, "save_steps": 400}  # cancelled after the burst


def _submit(http: httpx.Client, **body: Any) -> httpx.Response:
    body.setdefault("dataset", "sample:capitals")
    body.setdefault("hyperparameters", SMALL_TRAINING)
    return http.post("/jobs", json=body)


def _call(http: httpx.Client, n: int, training: list[str]) -> tuple[str, int]:
    """One call of the mix; returns (what, HTTP status)."""
    job_id = training[n % len(training)]
    kind = n % 8
    if kind == 0:
        response = _submit(http, metadata={"burst": str(n)})
        if response.status_code == 201:  # queued behind the training jobs: cancel it straight away
            return "create+cancel", http.post(f"/jobs/{response.json()['id']}/cancel").status_code
        return "create", response.status_code
    if kind == 1:
        content = (SAMPLES_DIR / "capitals.jsonl").read_bytes()
        files = {"file": (f"burst-{n}.jsonl", content, "application/jsonl")}
        return "upload", http.post("/files", files=files).status_code
    if kind == 2:
        return "metrics", http.get("/metrics").status_code
    if kind == 3:
        return "events", http.get(f"/jobs/{job_id}/events", params={"limit": 50}).status_code
    if kind == 4:
        return "list", http.get("/jobs", params={"limit": 20}).status_code
    return "job", http.get(f"/jobs/{job_id}").status_code


def test_200_concurrent_calls_while_jobs_train_no_server_error(
    svc_server: str, start_worker: StartWorker
) -> None:
    for n in range(2):
        start_worker("--worker-id", f"w{n}")
    limits = httpx.Limits(max_connections=CALLS, max_keepalive_connections=CALLS)
    with httpx.Client(base_url=svc_server, timeout=120, limits=limits) as http:
        training = [_submit(http, hyperparameters=TRAINING).json()["id"] for _ in range(2)]
        for job_id in training:  # both past model loading, recording steps
            wait_for(lambda j=job_id: job_status(http, j)["progress"]["step"] >= 1, 300, f"{job_id} to train")

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=CALLS) as pool:
            results = list(pool.map(lambda n: _call(http, n, training), range(CALLS)))
        elapsed = time.monotonic() - started
        print(f"{CALLS} concurrent calls in {elapsed:.1f}s: {Counter(results)}")

        assert len(results) == CALLS
        assert [r for r in results if r[1] >= 500] == []  # no server error
        assert {status for _, status in results} <= {200, 201}, Counter(results)
        jobs = [job_status(http, j) for j in training]
        assert [job["status"] for job in jobs] == ["running", "running"]  # they trained through it
        for job_id in training:
            http.post(f"/jobs/{job_id}/cancel")
        for job_id in training:
            assert (
                wait_status(http, job_id, "cancelled", "failed", "succeeded", timeout=120)["status"]
                == "cancelled"
            )
