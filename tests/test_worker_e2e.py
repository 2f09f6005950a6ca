"""End to end: real worker processes train the real tiny model; the API is the real app.

Each job trains a handful of steps, so a run takes seconds; most of it is the child interpreter
importing torch/transformers and loading the model. The full path over HTTP and the resume after a
killed worker also run on PostgreSQL; the other cases exercise the worker, not the database, and run on
SQLite only, to keep the suite's time.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.ml.data import SAMPLES_DIR
from tests.fixtures_service import (
    SMALL_TRAINING,
    StartWorker,
    all_events,
    job_status,
    pid_alive,
    wait_for,
    wait_status,
)
from tests.pg import ON_BOTH_DATABASES

pytestmark = pytest.mark.slow

LONG_TRAINING = {**SMALL_TRAINING, "max_steps": 500, "save_steps": 400}  # stopped long before the end
ONE_STEP = {**SMALL_TRAINING, "max_steps": 1, "save_steps": 1}


def submit(http: httpx.Client | TestClient, **body: Any) -> str:
    body.setdefault("dataset", "sample:capitals")
    body.setdefault("hyperparameters", SMALL_TRAINING)
    response = http.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


def child_pid(http: httpx.Client | TestClient, job_id: str) -> int | None:
    started = [e for e in all_events(http, job_id, kind="log") if e["message"].startswith("child process")]
    return int(started[-1]["data"]["pid"]) if started else None


def steps_of(http: httpx.Client | TestClient, job_id: str) -> list[int]:
    return [e["step"] for e in all_events(http, job_id, kind="metrics")]


@ON_BOTH_DATABASES
def test_submit_train_succeed_over_real_http(
    svc_server: str, start_worker: StartWorker, svc_settings: Settings
) -> None:
    # Two real workers share the queue: the job checked in detail below, and three one-step jobs.
    workers = [start_worker("--worker-id", f"w{n}") for n in range(2)]
    with httpx.Client(base_url=svc_server, timeout=30) as http:
        content = (SAMPLES_DIR / "capitals.jsonl").read_bytes()
        upload = http.post("/files", files={"file": ("capitals.jsonl", content, "application/jsonl")})
        assert upload.status_code == 201, upload.text
        job_id = submit(http, dataset=upload.json()["id"], suffix="e2e", metadata={"case": "happy"})
        others = [submit(http, hyperparameters=ONE_STEP) for _ in range(3)]
        assert_each_ran_once(http, [job_id, *others], {"w0", "w1"})
        job = job_status(http, job_id)
        assert job["status"] == "succeeded", job["error"]
        assert job["progress"] == {"step": 4, "total_steps": 4, "epoch": job["progress"]["epoch"]}
        assert job["backend"] == "hf" and job["attempts"] == 1 and job["train_loss"] is not None
        assert job["tokens_per_s"] > 0 and job["finished_at"] is not None
        assert job["eta_s"] == 0.0 and job["queue_position"] is None
        assert steps_of(http, job_id) == [1, 2, 3, 4]
        assert [c["step"] for c in http.get(f"/jobs/{job_id}/checkpoints").json()["data"]] == [4]

        adapter = job["adapter"]
        assert adapter["id"] == job["adapter_id"] and adapter["job_id"] == job_id
        listed = http.get("/adapters").json()["data"]
        assert sorted(a["job_id"] for a in listed) == sorted([job_id, *others])
        manifest = http.get(f"/adapters/{adapter['name']}").json()["manifest"]
        assert manifest["base_model"] == "tiny-gpt-oss" and manifest["backend"] == "hf"
        assert manifest["hyperparameters"]["max_steps"] == 4 and manifest["target_modules"]
        folder = svc_settings.adapters_dir / adapter["id"]
        assert (folder / "manifest.json").is_file() and (folder / "adapter_config.json").is_file()
        assert not list(svc_settings.adapters_dir.glob(".*"))  # no temp folder left from the rename

        deleted = http.delete(f"/adapters/{adapter['id']}")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert http.get(f"/adapters/{adapter['id']}").status_code == 404
        assert not folder.exists()
    assert all(worker.poll() is None for worker in workers)  # still serving the queue


def assert_each_ran_once(http: httpx.Client, job_ids: list[str], worker_ids: set[str]) -> None:
    """Every job succeeded after exactly one claim ("running on" event), and every worker took some."""
    ran_on = set()
    for job_id in job_ids:
        job = wait_status(http, job_id, "succeeded", "failed", "cancelled", timeout=300)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job["error"]
        claims = [e["message"] for e in all_events(http, job_id, "status") if "running on" in e["message"]]
        assert len(claims) == 1, claims
        ran_on.add(claims[0].split()[2])
    assert ran_on == worker_ids  # the work was shared, not run by one worker while another idled


def test_cancel_while_running_keeps_the_checkpoint(
    svc_client: TestClient, start_worker: StartWorker, svc_settings: Settings
) -> None:
    worker = start_worker()
    job_id = submit(svc_client, hyperparameters=LONG_TRAINING)
    wait_for(lambda: job_status(svc_client, job_id)["progress"]["step"] >= 1, 150, "the first step")
    assert svc_client.post(f"/jobs/{job_id}/cancel").json()["cancel_requested"] is True
    job = wait_status(svc_client, job_id, "cancelled", "failed", "succeeded", timeout=60)
    assert job["status"] == "cancelled", job["error"]
    assert job["backend"] == "hf"  # recorded when the model was loaded, not only on success
    assert job["progress"]["step"] < LONG_TRAINING["max_steps"] // 10  # stopped at once, not at the end
    checkpoints = svc_client.get(f"/jobs/{job_id}/checkpoints").json()["data"]
    assert checkpoints and checkpoints[-1]["step"] == job["progress"]["step"]  # saved on the way out
    assert job["adapter_id"] is None and not list(svc_settings.adapters_dir.glob("adp_*"))
    assert worker.poll() is None


@ON_BOTH_DATABASES
def test_sigkilled_worker_job_resumes_elsewhere_without_lost_or_repeated_steps(
    svc_client: TestClient, start_worker: StartWorker
) -> None:
    fast_lease = {"GPTOSS_HEARTBEAT_S": "0.2", "GPTOSS_LEASE_S": "2"}
    first = start_worker(**fast_lease)
    job_id = submit(svc_client, hyperparameters={**SMALL_TRAINING, "max_steps": 6, "save_steps": 3})

    def checkpointed() -> bool:
        return any(e["step"] == 3 for e in all_events(svc_client, job_id, kind="checkpoint"))

    wait_for(checkpointed, 150, "the first checkpoint")
    pid = child_pid(svc_client, job_id)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert pid is not None
    wait_for(lambda: not pid_alive(pid), 15, "the orphaned training child to die with its worker")
    killed_at = job_status(svc_client, job_id)
    assert killed_at["status"] == "running" and killed_at["progress"]["step"] < 6, "finished before the kill"

    second = start_worker(**fast_lease)
    job = wait_status(svc_client, job_id, "succeeded", "failed", "cancelled")
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    assert steps_of(svc_client, job_id) == list(range(1, 7))  # each step exactly once
    messages = [e["message"] or "" for e in all_events(svc_client, job_id)]
    assert any("stopped heartbeating" in m for m in messages)
    assert any(m.startswith("resuming from checkpoint-") for m in messages)
    assert second.poll() is None


def test_sigterm_checkpoints_and_requeues_then_another_worker_resumes(
    svc_client: TestClient, start_worker: StartWorker
) -> None:
    worker = start_worker()
    steps = 8  # checkpoints only when stopped (save_steps past the end): the resume must use that one
    job_id = submit(svc_client, hyperparameters={**SMALL_TRAINING, "max_steps": steps, "save_steps": 100})
    wait_for(lambda: job_status(svc_client, job_id)["progress"]["step"] >= 1, 150, "the first step")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    job = job_status(svc_client, job_id)
    assert job["status"] == "queued" and job["attempts"] == 0  # a clean hand-back is not a failed attempt
    assert job["progress"]["step"] < steps, "finished before the SIGTERM"
    checkpoints = svc_client.get(f"/jobs/{job_id}/checkpoints").json()["data"]
    assert checkpoints and checkpoints[-1]["step"] == job["progress"]["step"]
    assert any("shut down; checkpoint kept" in e["message"] for e in all_events(svc_client, job_id, "status"))

    second = start_worker()
    job = wait_status(svc_client, job_id, "succeeded", "failed", "cancelled")
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1 and job["backend"] == "hf"
    assert steps_of(svc_client, job_id) == list(range(1, steps + 1))  # each step exactly once
    resumed = f"resuming from checkpoint-{checkpoints[-1]['step']}"
    assert any(e["message"] == resumed for e in all_events(svc_client, job_id, "log"))
    assert second.poll() is None


def test_cancel_while_the_model_loads_stops_at_once(
    svc_client: TestClient, start_worker: StartWorker, svc_settings: Settings
) -> None:
    worker = start_worker()
    job_id = submit(svc_client)
    # The child records its backend just before it prepares the data and loads the model.
    wait_for(lambda: job_status(svc_client, job_id)["backend"], 150, "the child to pick its backend")
    svc_client.post(f"/jobs/{job_id}/cancel")
    job = wait_status(svc_client, job_id, "cancelled", "failed", "succeeded", timeout=60)
    assert job["status"] == "cancelled", job["error"]
    assert job["backend"] == "hf" and job["progress"]["step"] == 0  # shown although it never trained
    assert svc_client.get(f"/jobs/{job_id}/checkpoints").json()["data"] == []
    attempt_log = (svc_settings.jobs_dir / job_id / "attempt-1.log").read_text()
    assert "stop requested before the first step; exiting now" in attempt_log
    assert worker.poll() is None


def test_a_killed_child_resumes_and_a_bad_dataset_fails_clearly_and_the_worker_goes_on(
    svc_client: TestClient, start_worker: StartWorker, svc_settings: Settings
) -> None:
    worker = start_worker()
    doomed = submit(svc_client, hyperparameters={**LONG_TRAINING, "save_steps": 2})
    content = (SAMPLES_DIR / "capitals.jsonl").read_bytes()
    record = svc_client.post("/files", files={"file": ("c.jsonl", content, "application/jsonl")}).json()
    corrupted = submit(svc_client, dataset=record["id"])
    # The stored upload is damaged after the job was accepted (disk trouble, a careless operator).
    stored = svc_settings.uploads_dir / f"{record['sha256']}.jsonl"
    stored.write_text(content.decode().splitlines()[0] + "\n" + json.dumps({"messages": "oops"}) + "\n")

    def checkpointed() -> bool:
        return any(e["step"] == 2 for e in all_events(svc_client, doomed, kind="checkpoint"))

    wait_for(checkpointed, 150, "the first checkpoint")
    pid = child_pid(svc_client, doomed)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # what the out-of-memory killer does to a training process
    # Not the job's fault: a lost attempt, resumed from the checkpoint (issue 16: it used to fail).
    wait_for(
        lambda: any(m.startswith("resuming from checkpoint-") for m in _messages(svc_client, doomed, 2)),
        150,
        "the second attempt to resume",
    )
    job = job_status(svc_client, doomed)
    assert (job["status"], job["attempts"], job["lost_attempts"], job["error"]) == ("running", 2, 1, None)
    lost = [m for m in _messages(svc_client, doomed, 1) if m.startswith("queued:")]
    assert lost and "SIGKILL" in lost[0] and "lost attempt 1 of at most" in lost[0]
    svc_client.post(f"/jobs/{doomed}/cancel")
    assert wait_status(svc_client, doomed, "cancelled", "failed", "succeeded")["status"] == "cancelled"

    job = wait_status(svc_client, corrupted, "failed", "succeeded", "cancelled")
    assert job["error"]["code"] == "invalid_dataset", job["error"]
    assert "row 2" in job["error"]["message"] and "messages" in job["error"]["message"]
    assert worker.poll() is None


def _messages(http: TestClient, job_id: str, attempt: int) -> list[str]:
    return [e["message"] or "" for e in all_events(http, job_id) if e["attempt"] == attempt]
