"""The OpenAI fine-tuning routes' mapping, function by function: OpenAI's create request to our JobCreate,
our jobs, events, checkpoints and files to OpenAI's objects, checked against the `openai` package's own
types. The whole flow through the official client is in test_openai_ft_e2e.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from openai.types import FileObject as ClientFileObject
from openai.types.fine_tuning import FineTuningJob as ClientJob
from openai.types.fine_tuning import FineTuningJobEvent as ClientEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint as ClientCheckpoint
from pydantic import BaseModel

from app.api.routes.openai_ft import (
    FineTuningJobCreate,
    checkpoint_id,
    checkpoints_page,
    event_object,
    file_object,
    in_client_terms,
    job_object,
    job_request,
    native_event_id,
)
from app.exceptions import InvalidInput, NotFound
from app.ml.train_config import Hyperparameters, TrainConfig
from app.schemas import (
    AdapterPublic,
    CheckpointPublic,
    FilePublic,
    JobError,
    JobEventPublic,
    JobProgress,
    JobPublic,
)

BASE_LR = Hyperparameters.model_fields["learning_rate"].default
CREATED = datetime(2026, 1, 2, 3, 4, 5)  # naive UTC, as SQLite hands it back
CREATED_UNIX = int(CREATED.replace(tzinfo=UTC).timestamp())


def request(**fields: Any) -> FineTuningJobCreate:
    return FineTuningJobCreate.model_validate({"model": "tiny-gpt-oss", "training_file": "file_1", **fields})


def hyperparameters(**fields: Any) -> dict[str, Any]:
    return job_request(request(**fields)).body.hyperparameters.model_dump(exclude_unset=True)


def refused(**fields: Any) -> InvalidInput:
    with pytest.raises(InvalidInput) as err:
        job_request(request(**fields))
    return err.value


def same_as_client_type(ours: BaseModel, client_type: type[BaseModel]) -> dict[str, Any]:
    """Our object's JSON parses as the client's type, and every field the client declares comes back."""
    body = ours.model_dump(mode="json")
    parsed = client_type.model_validate(body)
    assert set(client_type.model_fields) <= set(body), set(client_type.model_fields) - set(body)
    assert parsed.model_dump(mode="json", exclude_unset=True).keys() <= body.keys()
    return body


# --- OpenAI request -> JobCreate ------------------------------------------------------------------------


def test_request_fields_map_onto_the_native_job() -> None:
    body = job_request(
        request(suffix="pirate", seed=7, metadata={"team": "a"}, validation_file="sample:capitals.heldout")
    ).body
    assert body.base_model == "tiny-gpt-oss" and body.dataset == "file_1"
    assert body.suffix == "pirate" and body.seed == 7 and body.metadata == {"team": "a"}
    assert body.hyperparameters.model_dump(exclude_unset=True) == {"eval_dataset": "sample:capitals.heldout"}


def test_auto_hyperparameters_leave_this_services_defaults() -> None:
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert hyperparameters(hyperparameters=auto) == {}
    assert hyperparameters() == {}


def test_openai_hyperparameters_become_ours() -> None:
    given = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 0.5, "lora_r": 4}
    assert hyperparameters(hyperparameters=given) == {
        "num_train_epochs": 3,
        "max_steps": 0,  # epochs, not the default step budget, bound the training
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 8,
        "learning_rate": 0.5 * BASE_LR,
        "lora_r": 4,
    }


def test_batch_size_keeps_a_given_micro_batch() -> None:
    ours = hyperparameters(hyperparameters={"batch_size": 12, "per_device_train_batch_size": 4})
    assert ours == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3}
    err = refused(hyperparameters={"batch_size": 10, "per_device_train_batch_size": 4})
    assert (
        err.field == "hyperparameters.batch_size"
        and "multiple of per_device_train_batch_size (4)" in err.message
    )


def test_the_method_form_is_the_same_request() -> None:
    given = {"n_epochs": 2, "batch_size": 4, "lora_alpha": 32}
    method = {"type": "supervised", "supervised": {"hyperparameters": given}}
    assert hyperparameters(method=method) == hyperparameters(hyperparameters=given)


def hp(**given: Any) -> dict[str, Any]:
    return {"hyperparameters": given}


LR_MULT = "hyperparameters.learning_rate_multiplier"


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        (hp(n_epochs=0), "hyperparameters.n_epochs", "at least 1"),
        (hp(n_epochs=True), "hyperparameters.n_epochs", "whole number"),
        (hp(batch_size="big"), "hyperparameters.batch_size", "'auto' or a whole"),
        (hp(learning_rate_multiplier=-1), LR_MULT, "above 0"),
        (hp(n_epochs=2, max_steps=10), "hyperparameters.n_epochs", "or max_steps, not both"),
        (hp(batch_size=2, gradient_accumulation_steps=2), "hyperparameters.batch_size", "not both"),
        (hp(learning_rate_multiplier=2, learning_rate=1e-4), LR_MULT, "or learning_rate, not both"),
        ({"method": {"type": "dpo"}}, "method.type", "must be 'supervised'"),
        ({"method": {"type": "supervised", "dpo": {}}}, "method.dpo", "not supported"),
        ({"method": {"type": "supervised"}, **hp()}, "hyperparameters", "or method, not both"),
        ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations", "not supported"),
        ({"suffix": "has spaces"}, "suffix", "pattern"),
        ({"validation_file": "x", **hp(eval_dataset="y")}, "validation_file", "not both"),
    ],
)
def test_what_cannot_be_honoured_is_refused_by_its_openai_name(
    fields: dict[str, Any], param: str, words: str
) -> None:
    err = refused(**fields)
    assert err.field == param and words in err.message and err.message.startswith(f"{param}: ")


def test_hyperparameter_limits_are_reported_by_the_openai_name() -> None:
    """The typed Hyperparameters model checks the limits; the client hears about the value it sent."""
    too_many = refused(hyperparameters={"n_epochs": 500})
    assert too_many.field == "hyperparameters.n_epochs"
    assert (
        str(too_many)
        == too_many.message
        == "hyperparameters.n_epochs: Input should be less than or equal to 100"
    )
    too_fast = refused(hyperparameters={"learning_rate_multiplier": 100})
    assert too_fast.field == LR_MULT and f"gives learning_rate {100 * BASE_LR:g}" in too_fast.message
    typo = refused(hyperparameters={"lora_rank": 8})
    assert typo.field == "hyperparameters.lora_rank" and "Extra inputs are not permitted" in typo.message


def test_native_errors_are_renamed_to_the_params_the_client_sent() -> None:
    wanted = job_request(request(hyperparameters={"learning_rate_multiplier": 10, "n_epochs": 50}))
    lr = in_client_terms(
        InvalidInput("hyperparameters.learning_rate", "must be at most 0.01"), wanted.params, wanted.notes
    )
    assert lr.field == "hyperparameters.learning_rate_multiplier"
    assert lr.message == (
        f"hyperparameters.learning_rate_multiplier: gives learning_rate {10 * BASE_LR:g} "
        f"(10 x {BASE_LR:g}): must be at most 0.01"
    )
    epochs = in_client_terms(
        InvalidInput("hyperparameters.num_train_epochs", "must be at most 100"), wanted.params, wanted.notes
    )
    assert (epochs.field, epochs.message) == (
        "hyperparameters.n_epochs",
        "hyperparameters.n_epochs: must be at most 100",
    )
    missing = in_client_terms(
        NotFound("file 'file_1' does not exist", field="dataset"), wanted.params, wanted.notes
    )
    assert isinstance(missing, NotFound) and missing.field == "training_file"
    assert missing.message == "training_file: file 'file_1' does not exist"
    other = InvalidInput("hyperparameters.lora_r", "must be at least 1")
    assert (
        in_client_terms(other, wanted.params, wanted.notes) is other
        and other.field == "hyperparameters.lora_r"
    )


# --- ours -> OpenAI objects ------------------------------------------------------------------------------


def config(**changes: Any) -> dict[str, Any]:
    values = {"base_model": "tiny-gpt-oss", "dataset": "/srv/data/files/abc.jsonl", "seed": 11, **changes}
    return TrainConfig(**values).model_dump(mode="json")


def job(**changes: Any) -> JobPublic:
    values: dict[str, Any] = {
        "id": "ftjob_0123abcd",
        "name": "pirate",
        "status": "queued",
        "base_model": "tiny-gpt-oss",
        "dataset": "file_0abc",
        "file_id": "file_0abc",
        "hyperparameters": config(),
        "metadata": {},
        "priority": 0,
        "progress": JobProgress(step=0, total_steps=None, epoch=None),
        "train_loss": None,
        "eval_loss": None,
        "tokens_per_s": None,
        "eta_s": None,
        "backend": None,
        "attempts": 0,
        "max_attempts": 3,
        "cancel_requested": False,
        "error": None,
        "adapter_id": None,
        "created_at": CREATED,
        "started_at": None,
        "finished_at": None,
    }
    return JobPublic(**{**values, **changes})


def test_a_queued_job_as_openai_sees_it() -> None:
    body = same_as_client_type(job_object(job()), ClientJob)
    assert body["object"] == "fine_tuning.job" and body["status"] == "queued"
    assert body["created_at"] == CREATED_UNIX and body["finished_at"] is None
    assert body["training_file"] == "file_0abc" and body["validation_file"] is None
    assert body["fine_tuned_model"] is None and body["trained_tokens"] is None and body["error"] is None
    assert body["seed"] == 11 and body["model"] == "tiny-gpt-oss" and body["user_provided_suffix"] == "pirate"
    assert body["result_files"] == [] and body["integrations"] == [] and body["estimated_finish"] is None
    hyper = body["hyperparameters"]
    assert hyper["n_epochs"] is None  # the default trains max_steps steps, not whole epochs
    assert hyper["batch_size"] == 4 and hyper["learning_rate_multiplier"] == 1.0 and hyper["max_steps"] == 30
    assert {"dataset", "eval_dataset", "max_rows", "max_bytes", "base_model"}.isdisjoint(
        hyper
    )  # no server paths
    assert body["method"] == {"type": "supervised", "supervised": {"hyperparameters": hyper}}


def test_resolved_hyperparameters_read_back_as_given() -> None:
    stored = config(max_steps=0, num_train_epochs=3, gradient_accumulation_steps=8, learning_rate=BASE_LR / 2)
    hyper = job_object(job(hyperparameters=stored)).hyperparameters
    assert (hyper.n_epochs, hyper.batch_size, hyper.learning_rate_multiplier) == (3, 8, 0.5)


def test_a_running_job_has_an_estimated_finish() -> None:
    running = job(status="running", eta_s=90.0, started_at=CREATED)
    assert job_object(running, now=1_000_000).estimated_finish == 1_000_090


def test_a_succeeded_job_names_its_model_and_tokens() -> None:
    adapter = AdapterPublic(
        id="adp_0123abcd",
        name="ft:tiny-gpt-oss:pirate:0123abcd",
        base_model="tiny-gpt-oss",
        base_fingerprint="f",
        backend="hf",
        job_id="ftjob_0123abcd",
        manifest={"metrics": {"tokens": 5120, "final_loss": 1.5}},
        created_at=CREATED,
    )
    done = job(
        status="succeeded",
        adapter_id=adapter.id,
        adapter=adapter,
        finished_at=datetime(2026, 1, 2, 3, 5, 5),
        hyperparameters=config(eval_dataset="file_0def"),
    )
    body = same_as_client_type(job_object(done), ClientJob)
    assert body["fine_tuned_model"] == adapter.name and body["trained_tokens"] == 5120
    assert body["finished_at"] == CREATED_UNIX + 60 and body["validation_file"] == "file_0def"


def test_a_failed_job_carries_openais_error() -> None:
    bad_data = job(status="failed", error=JobError(code="invalid_dataset", message="row 3: no messages"))
    assert same_as_client_type(job_object(bad_data), ClientJob)["error"] == {
        "code": "invalid_dataset",
        "message": "row 3: no messages",
        "param": "training_file",
    }
    crashed = job(status="failed", error=JobError(code="child_crashed", message="signal 9"))
    assert job_object(crashed).error is not None and job_object(crashed).error.param is None  # type: ignore[union-attr]


def event(
    kind: str, *, message: str | None = None, step: int | None = None, data: Any = None
) -> JobEventPublic:
    return JobEventPublic(
        id=42, kind=kind, attempt=1, step=step, message=message, data=data, created_at=CREATED
    )


def test_metrics_events_are_type_metrics_with_openais_loss_names() -> None:
    metrics = {"step": 3, "total_steps": 4, "loss": 1.25, "learning_rate": 1e-4, "eval_loss": None}
    body = same_as_client_type(event_object(event("metrics", step=3, data=metrics)), ClientEvent)
    assert body["id"] == "ftevent-42" and body["object"] == "fine_tuning.job.event"
    assert (body["type"], body["level"], body["created_at"]) == ("metrics", "info", CREATED_UNIX)
    assert body["message"] == "Step 3/4: training loss=1.2500"
    assert (
        body["data"]["train_loss"] == 1.25 and body["data"]["step"] == 3 and "valid_loss" not in body["data"]
    )
    evaluated = event_object(event("eval", step=4, data={"step": 4, "loss": None, "eval_loss": 2.0}))
    assert evaluated.type == "metrics" and evaluated.message == "Step 4: validation loss=2.0000"
    assert evaluated.data is not None and evaluated.data["valid_loss"] == 2.0


def test_status_and_log_events_are_messages() -> None:
    queued = same_as_client_type(event_object(event("status", message="queued")), ClientEvent)
    assert (queued["type"], queued["level"], queued["message"], queued["data"]) == (
        "message",
        "info",
        "queued",
        None,
    )
    failed = event_object(event("status", message="failed: child_crashed: signal 9"))
    assert failed.level == "error"
    log = event_object(event("log", message="child process started", data={"pid": 7}))
    assert log.type == "message" and log.data == {"pid": 7}


def test_event_cursor_round_trips() -> None:
    assert native_event_id(None) is None and native_event_id("ftevent-42") == 42
    # Another object's id, digits int() refuses, and a number past the databases' bigint: a 400 on
    # `after`, never a 500 from the driver.
    for bad in ("ftjob_1", "ftevent-\u00b2", "ftevent-99999999999999999999999"):
        with pytest.raises(InvalidInput) as err:
            native_event_id(bad)
        assert err.value.field == "after"


def checkpoint(step: int, loss: float | None = 1.0) -> CheckpointPublic:
    metrics = {"step": step, "loss": loss} if loss is not None else None
    return CheckpointPublic(
        step=step, path=f"/srv/jobs/x/checkpoint-{step}", created_at=CREATED, metrics=metrics
    )


def test_checkpoints_page_newest_first_with_openais_fields() -> None:
    found = [checkpoint(step) for step in (2, 4, 6)]
    page = checkpoints_page("ftjob_0123", found, after=None, limit=2)
    body = page.model_dump(mode="json")
    assert [c["step_number"] for c in body["data"]] == [6, 4] and body["has_more"] is True
    assert body["first_id"] == checkpoint_id("ftjob_0123", 6) == "ftckpt_0123_6"
    assert body["last_id"] == "ftckpt_0123_4"
    first = same_as_client_type(page.data[0], ClientCheckpoint)
    assert first["object"] == "fine_tuning.job.checkpoint" and first["fine_tuning_job_id"] == "ftjob_0123"
    assert first["metrics"]["train_loss"] == 1.0 and first["metrics"]["step"] == 6
    assert first["fine_tuned_model_checkpoint"] == "ftjob_0123:ckpt-step-6"
    assert "path" not in first  # no server paths
    rest = checkpoints_page("ftjob_0123", found, after=body["last_id"], limit=2)
    assert [c.step_number for c in rest.data] == [2] and rest.has_more is False
    with pytest.raises(InvalidInput) as err:
        checkpoints_page("ftjob_0123", found, after="ftckpt_9999_4", limit=2)  # another job's id
    assert err.value.field == "after"
    for bad in ("ftckpt_0123_\u00b2", "ftckpt_0123_99999999999999999999999"):
        with pytest.raises(InvalidInput):
            checkpoints_page("ftjob_0123", found, after=bad, limit=2)


def test_checkpoint_without_logged_metrics() -> None:
    body = same_as_client_type(
        checkpoints_page("ftjob_1", [checkpoint(5, None)], after=None, limit=10).data[0], ClientCheckpoint
    )
    assert body["metrics"]["train_loss"] is None and body["metrics"]["step"] == 5


def test_files_are_openai_file_objects() -> None:
    record = FilePublic(
        id="file_0abc",
        filename="capitals.jsonl",
        purpose="fine-tune",
        bytes=100,
        rows=3,
        sha256="0" * 64,
        created_at=CREATED,
    )
    body = same_as_client_type(file_object(record), ClientFileObject)
    assert body == {
        "id": "file_0abc",
        "object": "file",
        "bytes": 100,
        "created_at": CREATED_UNIX,
        "filename": "capitals.jsonl",
        "purpose": "fine-tune",
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }
