"""The serving promises over real HTTP against the one session server (uvicorn on 127.0.0.1): many
clients at once over two adapters and the base each get their solo answer, and an adapter that a real
worker process trains from a POST /jobs is served by the running server, without a restart."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures_inference import DEVELOPER, QUESTION, LiveServer, reference_greedy
from tests.fixtures_service import ROOT, SMALL_TRAINING, wait_status, worker_env

QUESTIONS = [QUESTION, "Name the capital city of France.", "Tell me about Paris and its history, please."]
ANSWER_KEYS = ("adapter", "reasoning", "content", "finish_reason", "usage")


def payload(adapter: str | None, question: str = QUESTION, *, sampled: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "adapter": adapter,
        "messages": [{"role": "user", "content": question}],
        "developer": DEVELOPER,
        "reasoning_effort": "low",
        "max_new_tokens": 12,
        "temperature": 0,
    }
    if sampled:  # a seeded sampled row: per-row generators keep it independent of its batch neighbours
        body.update(temperature=0.8, top_p=0.9, seed=11)
    return body


def answer(server: LiveServer, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return {key: data[key] for key in ANSWER_KEYS}


def test_16_concurrent_http_clients_over_two_adapters_and_the_base_get_their_solo_answers(
    inference_server: LiveServer,
) -> None:
    rng = random.Random(7)
    bodies = [
        payload(rng.choice(["capitals", "continents", None]), rng.choice(QUESTIONS), sampled=i == 15)
        for i in range(16)
    ]
    assert {b["adapter"] for b in bodies} == {"capitals", "continents", None}
    solo = [answer(inference_server, b) for b in bodies]  # one at a time: nothing to share a batch with
    engine = inference_server.engine
    batched_before = engine.stats["batched_rows"]
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        together = list(pool.map(lambda b: answer(inference_server, b), bodies))
    assert together == solo
    assert engine.stats["batched_rows"] > batched_before  # they really shared batches
    # The three models answer differently, so an answer from the wrong adapter could not pass unseen.
    by_model: dict[str | None, set[str]] = {}
    for a in together:
        by_model.setdefault(a["adapter"], set()).add(a["content"])
    assert len(by_model) == 3
    assert not any(by_model[x] & by_model[y] for x, y in [("capitals", "continents"), ("capitals", None)])
    assert not by_model["continents"] & by_model[None]


@pytest.fixture
def live_worker(inference_server: LiveServer, tmp_path: Path) -> Any:
    """A real `python -m workers.worker` process on the session server's database and data folder."""
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.worker"],
            cwd=ROOT,
            env=worker_env(inference_server.settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # idle by now: it exits at once
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class TeeSink:
    """Passes every call on to the request's real sink and keeps a copy of the token ids: the HTTP
    answer is text, and the tiny model's text can be empty where its tokens still differ."""

    def __init__(self, sink: Any, tokens: list[int]) -> None:
        self._sink, self.tokens = sink, tokens

    def put_token(self, token_id: int) -> None:
        self.tokens.append(token_id)
        self._sink.put_token(token_id)

    def finish(self, reason: str, completion_tokens: int) -> None:
        self._sink.finish(reason, completion_tokens)

    def fail(self, error: BaseException) -> None:
        self._sink.fail(error)

    def cancelled(self) -> bool:
        return bool(self._sink.cancelled())


@pytest.mark.slow
def test_adapter_trained_by_a_real_job_is_served_without_restart(
    inference_server: LiveServer,
    live_worker: subprocess.Popen[bytes],
    models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A strong learning rate so a few steps visibly change the answer of the random tiny base.
    hyperparameters = {**SMALL_TRAINING, "learning_rate": 1e-2, "lora_r": 16, "lora_alpha": 64}
    with httpx.Client(base_url=inference_server.url, timeout=30) as http:
        body = {"dataset": "sample:capitals", "suffix": "live", "hyperparameters": hyperparameters}
        created = http.post("/jobs", json=body)
        assert created.status_code == 201, created.text
        job = wait_status(http, created.json()["id"], "succeeded", "failed", "cancelled")
    assert job["status"] == "succeeded", job["error"]
    adapter = job["adapter"]
    assert live_worker.poll() is None  # the same server and worker, nothing restarted

    engine = inference_server.engine
    served_tokens: list[list[int]] = []
    real_submit = engine.submit

    def watching_submit(prompt_ids: list[int], params: Any, sink: Any, spec: Any = None) -> None:
        served_tokens.append([])
        real_submit(prompt_ids, params, TeeSink(sink, served_tokens[-1]), spec)

    monkeypatch.setattr(engine, "submit", watching_submit)
    served = answer(inference_server, payload(adapter["name"]))
    assert served["adapter"] == adapter["name"]
    assert adapter["id"] in engine.loaded_adapters()
    answer(inference_server, payload(None))
    with_adapter, base = served_tokens
    # Exactly what the job's adapter answers alone on a fresh copy of the base, outside the server,
    # and not what the base answers: the new adapter really is applied.
    assert with_adapter == _reference_tokens(
        inference_server.settings.adapters_dir / adapter["id"], models_dir
    )
    assert with_adapter != base


def _reference_tokens(folder: Path, models_dir: Path) -> list[int]:
    from peft import PeftModel

    from app.ml.harmony import render_prompt
    from app.ml.modeling import load_base

    base = load_base("tiny-gpt-oss", backend="hf", models_dir=models_dir, for_training=False).model
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    turns = [{"role": "user", "content": QUESTION}]
    return reference_greedy(model, render_prompt(turns, developer=DEVELOPER, reasoning_effort="low"), 12)
