"""Request and response shapes of the service routes (files, jobs, adapters). Examples feed /docs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from app.ml.train_config import Hyperparameters
from app.models import JobStatus

T = TypeVar("T")


def as_utc(moment: datetime) -> datetime:
    # The database hands back naive UTC (SQLite has no time zones): say so in every answer.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# A timestamp as the API answers it: UTC, with its offset ("...Z"), never a bare local-looking time.
UtcDateTime = Annotated[datetime, AfterValidator(as_utc)]

MAX_METADATA_KEYS = 16
MAX_METADATA_VALUE = 512


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. `row` for a bad dataset row, `details` for a 422

    code: str = Field(description="Machine-readable: invalid_input, not_found, conflict, busy, ...")
    message: str = Field(description="What was wrong and what to do, naming the field and the limit.")
    field: str | None = Field(None, description="The request field at fault, where there is one.")


class ErrorResponse(BaseModel):
    """Every error of the native routes."""

    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, ...")
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """Errors of the /v1 routes, in OpenAI's shape."""

    error: OpenAIErrorDetail


class Page(BaseModel, Generic[T]):
    """One page of a list. Pass `next_cursor` back as `after` for the next page."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    next_cursor: str | None = None


# --- files ------------------------------------------------------------------------------------------


class FilePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["file"] = "file"
    filename: str
    purpose: str
    bytes: int
    rows: int
    sha256: str
    created_at: UtcDateTime


# --- jobs -------------------------------------------------------------------------------------------


class JobCreate(BaseModel):
    """A fine-tuning job. `hyperparameters`: the training options a client may set (Hyperparameters)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "dataset": "sample:capitals",
                    "suffix": "pirate",
                    "seed": 42,
                    "hyperparameters": {"max_steps": 60, "learning_rate": 2e-4, "lora_r": 8},
                    "metadata": {"team": "research"},
                }
            ]
        },
    )

    base_model: str | None = Field(
        None, max_length=255, description="Hub id or local folder; default: the server's resolved base model."
    )
    dataset: str = Field(
        ...,
        min_length=1,
        max_length=512,
        description="An uploaded file id (file_...), a bundled sample (sample:<name>) or hf:<dataset id>.",
    )
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters,
        description="Training and LoRA options; each has its type, default, limits and help below.",
    )
    suffix: str | None = Field(
        None,
        min_length=1,
        max_length=40,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Becomes part of the adapter's name: <base>:<suffix>:<job id>.",
    )
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Random seed; default TrainConfig's.")
    priority: int = Field(0, ge=0, le=10, description="Higher runs first; equal priorities run in order.")
    metadata: dict[str, str] = Field(
        default_factory=dict, description=f"Up to {MAX_METADATA_KEYS} string pairs, kept with the job."
    )

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"must have at most {MAX_METADATA_KEYS} keys")
        for key, item in value.items():
            if len(key) > 64 or len(item) > MAX_METADATA_VALUE:
                raise ValueError(
                    f"keys must be at most 64 and values at most {MAX_METADATA_VALUE} characters"
                )
        return value


class JobError(BaseModel):
    code: str = Field(
        description="invalid_dataset, invalid_job, training_error, out_of_memory, child_crashed, "
        "worker_lost (max_lost_attempts attempts lost to crashes), adapter_registration_failed, or "
        "internal_error (the worker could not record the result; see its log)."
    )
    message: str


class JobProgress(BaseModel):
    step: int
    total_steps: int | None
    epoch: float | None


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    name: str | None
    status: JobStatus
    base_model: str
    dataset: str
    file_id: str | None
    hyperparameters: dict[str, Any]
    metadata: dict[str, Any]
    priority: int
    progress: JobProgress
    train_loss: float | None
    eval_loss: float | None
    tokens_per_s: float | None
    eta_s: float | None
    queue_position: int | None = Field(None, description="1 = next to run; only while queued.")
    backend: str | None
    attempts: int
    max_attempts: int
    lost_attempts: int = Field(
        0,
        description="Attempts lost to crashes that were not the job's doing (worker or training process "
        "killed); each resumed from the last checkpoint. Limited by the server's max_lost_attempts.",
    )
    cancel_requested: bool
    error: JobError | None
    adapter_id: str | None
    adapter: AdapterPublic | None = None
    created_at: UtcDateTime
    started_at: UtcDateTime | None
    finished_at: UtcDateTime | None


class JobEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    attempt: int
    step: int | None
    message: str | None
    data: dict[str, Any] | None
    created_at: UtcDateTime


class CheckpointPublic(BaseModel):
    step: int
    path: str
    created_at: UtcDateTime
    metrics: dict[str, Any] | None = None


# --- adapters ---------------------------------------------------------------------------------------


class AdapterPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    base_model: str
    base_fingerprint: str | None
    backend: str | None
    job_id: str | None
    manifest: dict[str, Any]
    created_at: UtcDateTime


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


JobPublic.model_rebuild()
