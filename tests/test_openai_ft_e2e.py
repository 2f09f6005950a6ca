"""The official `openai` client, unchanged, through upload, train, poll and chat against a real uvicorn
server with API keys on, and a real worker process training the real tiny model."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import openai
import pytest

from app.config import Settings
from app.db import make_engine, make_sessionmaker
from app.keys import create_api_key
from app.ml.data import SAMPLES_DIR
from tests.fixtures_service import SMALL_TRAINING, StartWorker

pytestmark = pytest.mark.slow

# Our own options ride along as extra hyperparameters; batch_size stands for the micro-batch x accumulation.
EXTRA = {
    k: v
    for k, v in SMALL_TRAINING.items()
    if k not in ("gradient_accumulation_steps", "per_device_train_batch_size")
}
LONG_EPOCHS = {k: v for k, v in EXTRA.items() if k != "max_steps"}  # n_epochs bounds the training instead


@pytest.fixture
def svc_settings(settings: Settings) -> Settings:
    """The service settings of tests/fixtures_service.py, with API keys on."""
    return settings.model_copy(update={"load_model_on_start": False, "log_json": False, "auth": "keys"})


@pytest.fixture
def clients(svc_server: str, svc_settings: Settings) -> Callable[[str], openai.OpenAI]:
    """An official client per scope set, each with its own real API key."""
    engine = make_engine(svc_settings)
    made: dict[str, openai.OpenAI] = {}

    def client(scopes: str) -> openai.OpenAI:
        if scopes not in made:
            with make_sessionmaker(engine)() as session:
                _, secret = create_api_key(session, f"test-{scopes}", scopes.split(","))
            made[scopes] = openai.OpenAI(
                base_url=f"{svc_server}/v1", api_key=secret, max_retries=0, timeout=120
            )
        return made[scopes]

    return client


def loose(value: dict[str, Any]) -> Any:
    """A request dict with our own hyperparameters, which the client's TypedDicts do not list."""
    return value


def param(err: openai.APIStatusError) -> Any:
    return cast(dict[str, Any], err.body)["param"]


def data(event: Any) -> dict[str, Any]:
    return cast(dict[str, Any], event.data or {})


def poll(client: openai.OpenAI, job_id: str, done: Callable[[Any], bool], timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if done(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")


def test_upload_train_poll_and_chat_with_the_official_client(
    clients: Callable[[str], openai.OpenAI], start_worker: StartWorker, tmp_path: Path
) -> None:
    # One tenant runs the flow; keys with fewer scopes are refused by scope (403) before anything else,
    # and, being other tenants, see none of its objects (404).
    trainer, reader, chatter = clients("train,read,generate"), clients("read"), clients("generate")
    sample = SAMPLES_DIR / "capitals.jsonl"
    with pytest.raises(openai.PermissionDeniedError):  # uploading needs `train`, as POST /files does
        reader.files.create(file=sample.open("rb"), purpose="fine-tune")
    training = trainer.files.create(file=sample.open("rb"), purpose="fine-tune")
    assert (training.object, training.purpose, training.filename) == ("file", "fine-tune", "capitals.jsonl")
    assert training.bytes == sample.stat().st_size and abs(training.created_at - time.time()) < 60
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(sample.read_text().splitlines(keepends=True)[:4]))
    validation = trainer.files.create(file=held_out.open("rb"), purpose="fine-tune")
    assert trainer.files.retrieve(training.id).bytes == training.bytes
    assert trainer.files.content(training.id).read() == sample.read_bytes()
    assert [f.id for f in trainer.files.list()] == [validation.id, training.id]
    with pytest.raises(openai.NotFoundError):  # another tenant's file, as if it did not exist
        reader.files.retrieve(training.id)
    with pytest.raises(openai.NotFoundError):
        reader.files.content(training.id)
    assert list(reader.files.list()) == []

    job = trainer.fine_tuning.jobs.create(
        model="tiny-gpt-oss",
        training_file=training.id,
        validation_file=validation.id,
        suffix="capitals",
        seed=7,
        method=loose({"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 1, **EXTRA}}}),
    )
    assert job.status == "queued" and job.fine_tuned_model is None and job.seed == 7
    assert job.training_file == training.id and job.validation_file == validation.id
    assert job.hyperparameters.batch_size == 1 and job.hyperparameters.n_epochs is None  # max_steps bounds it
    assert (job.hyperparameters.model_extra or {})["max_steps"] == 4
    second = trainer.fine_tuning.jobs.create(
        model="tiny-gpt-oss",
        training_file=training.id,
        hyperparameters=loose({"n_epochs": 1, "learning_rate_multiplier": 2, **LONG_EPOCHS}),
        metadata={"experiment": "epochs"},
    )
    assert second.hyperparameters.n_epochs == 1 and second.hyperparameters.learning_rate_multiplier == 2
    assert [j.id for j in trainer.fine_tuning.jobs.list(metadata={"experiment": "epochs"})] == [second.id]
    with pytest.raises(
        openai.PermissionDeniedError
    ):  # cancelling needs `train`, as POST /jobs/{id}/cancel does
        reader.fine_tuning.jobs.cancel(second.id)
    cancelled = trainer.fine_tuning.jobs.cancel(second.id)  # still queued: there is no worker yet
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None

    start_worker()
    done = poll(trainer, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model and done.fine_tuned_model.startswith("ft:tiny-gpt-oss:capitals:")
    assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at >= done.created_at
    assert done.error is None and done.estimated_finish is None and done.user_provided_suffix == "capitals"  # type: ignore[attr-defined]

    listed = list(trainer.fine_tuning.jobs.list(limit=1))  # one per page: the client follows `after`
    assert [j.id for j in listed] == [second.id, job.id]
    page = trainer.fine_tuning.jobs.list(limit=1)
    assert page.has_more is True and page.data[0].id == second.id
    assert [j.id for j in trainer.fine_tuning.jobs.list(after=second.id, limit=5).data] == [job.id]

    events = list(trainer.fine_tuning.jobs.list_events(job.id, limit=3))
    assert all(e.object == "fine_tuning.job.event" and e.id.startswith("ftevent-") for e in events)
    numbers = [int(e.id.removeprefix("ftevent-")) for e in events]
    assert numbers == sorted(numbers, reverse=True) and len(set(numbers)) == len(numbers)  # newest first
    assert events[0].message.startswith("succeeded") and events[-1].message == "queued"
    steps = [data(e)["step"] for e in events if e.type == "metrics" and data(e).get("train_loss") is not None]
    assert sorted(steps) == [1, 2, 3, 4]
    assert any(e.type == "metrics" and data(e).get("valid_loss") is not None for e in events)

    checkpoints = list(trainer.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [4]
    assert checkpoints[0].metrics.train_loss is not None and checkpoints[0].fine_tuning_job_id == job.id

    model = trainer.models.retrieve(done.fine_tuned_model)
    assert model.id == done.fine_tuned_model and model.owned_by == "adapter"
    with pytest.raises(openai.NotFoundError):  # another tenant's adapter
        chatter.chat.completions.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
    assert list(reader.fine_tuning.jobs.list()) == []
    answer = trainer.chat.completions.create(
        model=done.fine_tuned_model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8,
        temperature=0,
    )
    assert answer.model == done.fine_tuned_model and answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.completion_tokens >= 1

    deleted = trainer.files.delete(validation.id)
    assert deleted.deleted is True and deleted.id == validation.id
    with pytest.raises(openai.NotFoundError):
        trainer.files.retrieve(validation.id)


def test_errors_reach_the_client_in_openais_shape(clients: Callable[[str], openai.OpenAI]) -> None:
    trainer = clients("train,read")
    upload = trainer.files.create(file=(SAMPLES_DIR / "capitals.jsonl").open("rb"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError) as missing:
        trainer.fine_tuning.jobs.create(model="tiny-gpt-oss", training_file="file_0123456789abcdef")
    assert param(missing.value) == "training_file"
    assert "file_0123456789abcdef" in missing.value.message

    with pytest.raises(openai.BadRequestError) as bad:
        trainer.fine_tuning.jobs.create(
            model="tiny-gpt-oss",
            training_file=upload.id,
            hyperparameters=loose({"lora_r": 0}),
        )
    assert param(bad.value) == "hyperparameters.lora_r" and bad.value.code == "invalid_input"
    assert "hyperparameters.lora_r" in bad.value.message
    with pytest.raises(openai.BadRequestError) as epochs:
        trainer.fine_tuning.jobs.create(
            model="tiny-gpt-oss", training_file=upload.id, hyperparameters={"n_epochs": 0}
        )
    assert param(epochs.value) == "hyperparameters.n_epochs"

    with pytest.raises(openai.BadRequestError) as bad_file:
        trainer.files.create(file=("bad.jsonl", b'{"messages": []}\n'), purpose="fine-tune")
    assert param(bad_file.value) == "file" and "row 1" in bad_file.value.message
    with pytest.raises(openai.BadRequestError) as purpose:
        trainer.files.create(file=(SAMPLES_DIR / "capitals.jsonl").open("rb"), purpose="batch")
    assert param(purpose.value) == "purpose"
    with pytest.raises(openai.NotFoundError) as no_job:
        trainer.fine_tuning.jobs.retrieve("ftjob_0123456789abcdef")
    assert param(no_job.value) == "job_id"
    with pytest.raises(openai.NotFoundError) as no_model:
        trainer.models.retrieve("ft:tiny-gpt-oss:none:00000000")
    assert no_model.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(trainer.base_url), api_key="gpt-wrong", max_retries=0).files.list()
    with pytest.raises(openai.PermissionDeniedError):  # reading jobs needs `read`, which a generate key lacks
        clients("generate").fine_tuning.jobs.list()
    body = json.loads(trainer.fine_tuning.jobs.with_raw_response.list().text)
    assert body == {"object": "list", "data": [], "has_more": False}
