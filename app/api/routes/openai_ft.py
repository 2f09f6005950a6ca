"""OpenAI's fine-tuning API under /v1: files, fine_tuning.jobs (events, checkpoints) and models.retrieve,
so one `OpenAI(base_url="http://host:8000/v1", api_key=KEY)` carries a client through upload, train,
poll and chat (/v1/chat/completions lives in openai_compat).

One implementation underneath: every route here calls the native route's own function (files.py,
jobs.py, adapters.py), which does the checks, the queueing and the SQL, and only maps shapes on the
way in and out. The mapping functions are pure and tested on their own.

Where this server differs from OpenAI, and why:
- `validating_files` never appears: files are validated row by row on upload, and the job's datasets
  again (rendered and length-checked) while `jobs.create` runs, so a create either fails at once with
  a 400 naming the file or returns a `queued` job.
- `cancel` of a running job answers `running` (the cancel is flagged); the worker stops it within
  seconds, keeping its checkpoints, and the job then reads `cancelled`.
- `result_files` is empty: the per-step metrics are the `metrics` events and the checkpoints' metrics.
- `fine_tuned_model_checkpoint` names a checkpoint folder of the job; only the final adapter (the
  job's `fine_tuned_model`) is registered for inference.
- Lists page as OpenAI's do (the client passes the last id as `after`): jobs, files, events and
  checkpoints newest first; at most 100 per page (1000 events), `has_more` tells of the rest.
- Invalid parameters are 400 here, as at OpenAI (the client raises BadRequestError); the native
  routes, and /v1/chat/completions, answer 422.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import APIRouter, Form, Header, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app import queue
from app.api.deps import ReadKey, SessionDep, SettingsDep, TrainKey, WriteSessionDep
from app.api.routes import adapters, files, jobs
from app.api.routes.openai_compat import OpenAIRoute, unix_time
from app.api.routes.openai_compat import _model_object as model_object
from app.exceptions import InvalidInput, NotFound, ServiceError
from app.ml.train_config import Hyperparameters
from app.pagination import MAX_EVENT_ID
from app.schemas import CheckpointPublic, FilePublic, JobCreate, JobEventPublic, JobPublic

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
FINE_TUNE = "fine-tune"
# The three hyperparameters OpenAI defines; every other key is one of our Hyperparameters.
OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
# The client's own options come back in `hyperparameters`; eval_dataset comes back as validation_file.
_SHOWN_CONFIG = [name for name in Hyperparameters.model_fields if name != "eval_dataset"]
# Our request fields under OpenAI's names, for error `param`s.
_REQUEST_FIELDS = {
    "base_model": "model",
    "dataset": "training_file",
    "hyperparameters.eval_dataset": "validation_file",
}


def _default(field: str) -> Any:
    return Hyperparameters.model_fields[field].default


# --- response shapes (openai/types/file_object.py, openai/types/fine_tuning/*.py) ------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = Field(
        "processed", description="Always processed: a file is validated before it is stored."
    )
    expires_at: int | None = None
    status_details: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class FineTuningError(BaseModel):
    code: str
    message: str
    param: str | None = None


class OpenAIHyperparameters(BaseModel):
    """OpenAI's three, resolved, plus every training option of ours that the job used."""

    model_config = ConfigDict(extra="allow")

    n_epochs: int | float | None = Field(
        description="Epochs trained when max_steps is 0; null when max_steps bounds the training."
    )
    batch_size: int = Field(description="per_device_train_batch_size x gradient_accumulation_steps.")
    learning_rate_multiplier: float = Field(description="learning_rate / this service's base learning rate.")


class SupervisedMethod(BaseModel):
    hyperparameters: OpenAIHyperparameters


class FineTuningMethod(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    error: FineTuningError | None
    fine_tuned_model: str | None = Field(description="The adapter's name: pass it as `model` to chat.")
    hyperparameters: OpenAIHyperparameters
    method: FineTuningMethod
    model: str
    organization_id: str = "local"
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    metadata: dict[str, Any] | None
    user_provided_suffix: str | None


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class OpenAIList(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool


class OpenAIIdList(OpenAIList[T], Generic[T]):
    """The lists where OpenAI also names the first and last ids (files, checkpoints)."""

    first_id: str | None
    last_id: str | None


# --- request shapes ----------------------------------------------------------------------------------


class FineTuningJobCreate(BaseModel):
    """OpenAI's job-create body. `hyperparameters` (or `method.supervised.hyperparameters`) takes
    n_epochs, batch_size and learning_rate_multiplier ("auto" = this service's defaults) and any
    training option of app.ml.train_config.Hyperparameters (lora_r, target_modules, max_steps...)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "openai/gpt-oss-20b",
                    "training_file": "file_0193c4e8a0b1c2d3e4f5a6b7",
                    "suffix": "pirate",
                    "hyperparameters": {"n_epochs": 2, "batch_size": 8, "lora_r": 16},
                }
            ]
        },
    )

    model: str = Field(..., min_length=1, max_length=255, description="The base model to fine-tune.")
    training_file: str = Field(
        ..., min_length=1, max_length=512, description="An uploaded file id, or a bundled sample:<name>."
    )
    validation_file: str | None = Field(None, max_length=512, description="Held-out data, same forms.")
    suffix: str | None = Field(None, description="Becomes part of fine_tuned_model.")
    seed: int | None = None
    hyperparameters: dict[str, Any] | None = None
    method: dict[str, Any] | None = Field(
        None, description='{"type": "supervised", "supervised": {"hyperparameters": {...}}}'
    )
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = Field(None, description="Not supported; leave it out.")


class JobRequest(BaseModel):
    """A create request in our terms, and how to name our fields in errors in the client's terms."""

    body: JobCreate
    params: dict[str, str]  # our field -> the OpenAI param it came from
    notes: dict[str, str] = Field(default_factory=dict)  # our field -> how its value was derived


# --- mapping: OpenAI request -> ours -------------------------------------------------------------------


def job_request(req: FineTuningJobCreate) -> JobRequest:
    """Our JobCreate for an OpenAI create request; refuses what it cannot honour, naming the param."""
    if req.integrations:
        raise InvalidInput("integrations", "are not supported by this server; leave them out")
    params = dict(_REQUEST_FIELDS)
    notes: dict[str, str] = {}
    ours, (epochs, batch, multiplier) = _split_hyperparameters(req)
    ours.update(_epochs(epochs, ours, params))
    ours.update(_batch(batch, ours, params))
    ours.update(_learning_rate(multiplier, ours, params, notes))
    if req.validation_file is not None:
        if "eval_dataset" in ours:
            raise InvalidInput(
                "validation_file", "set validation_file or hyperparameters.eval_dataset, not both"
            )
        ours["eval_dataset"] = req.validation_file
    try:
        body = JobCreate(
            base_model=req.model,
            dataset=req.training_file,
            hyperparameters=ours,
            suffix=req.suffix,
            seed=req.seed,
            metadata=req.metadata or {},
        )
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise in_client_terms(InvalidInput(field, first["msg"]), params, notes) from None
    return JobRequest(body=body, params=params, notes=notes)


def _split_hyperparameters(req: FineTuningJobCreate) -> tuple[dict[str, Any], tuple[Any, Any, Any]]:
    """(our fields, (n_epochs, batch_size, learning_rate_multiplier)) from either place OpenAI takes them."""
    given = req.hyperparameters
    if req.method is not None:
        if given is not None:
            raise InvalidInput(
                "hyperparameters", "set hyperparameters or method, not both (method is current)"
            )
        given = _supervised(req.method)
    ours = dict(given or {})
    return ours, tuple(ours.pop(name, "auto") for name in OPENAI_HYPERPARAMETERS)  # type: ignore[return-value]


def _supervised(method: dict[str, Any]) -> dict[str, Any]:
    if method.get("type") != "supervised":
        raise InvalidInput(
            "method.type",
            f"must be 'supervised' (dpo and reinforcement are not offered); got {method.get('type')!r}",
        )
    unknown = sorted(set(method) - {"type", "supervised"})
    if unknown:
        raise InvalidInput(f"method.{unknown[0]}", "is not supported; only method.supervised is")
    supervised = method.get("supervised") or {}
    if not isinstance(supervised, dict) or set(supervised) - {"hyperparameters"}:
        raise InvalidInput("method.supervised", "takes only hyperparameters")
    hyperparameters = supervised.get("hyperparameters") or {}
    if not isinstance(hyperparameters, dict):
        raise InvalidInput("method.supervised.hyperparameters", "must be an object")
    return hyperparameters


def _whole(name: str, value: Any) -> int | None:
    """None for "auto"; else a whole number of at least 1 (bool is refused, though Python calls it int)."""
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(
            f"hyperparameters.{name}", f"must be 'auto' or a whole number of at least 1; got {value!r}"
        )
    return value


def _conflict(ours: dict[str, Any], name: str, *fields: str) -> None:
    for field in fields:
        if field in ours:
            raise InvalidInput(f"hyperparameters.{name}", f"set {name} or {field}, not both")


def _epochs(value: Any, ours: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
    """n_epochs trains whole epochs (max_steps 0); "auto" keeps this service's step-bounded default."""
    epochs = _whole("n_epochs", value)
    if epochs is None:
        return {}
    _conflict(ours, "n_epochs", "max_steps", "num_train_epochs")
    params["hyperparameters.num_train_epochs"] = "hyperparameters.n_epochs"
    return {"num_train_epochs": epochs, "max_steps": 0}


def _batch(value: Any, ours: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
    """batch_size rows per optimizer step: the micro-batch (given, else our default) times accumulation."""
    batch = _whole("batch_size", value)
    if batch is None:
        return {}
    _conflict(ours, "batch_size", "gradient_accumulation_steps")
    micro = ours.get("per_device_train_batch_size", min(batch, _default("per_device_train_batch_size")))
    if isinstance(micro, int) and micro >= 1 and batch % micro:
        raise InvalidInput(
            "hyperparameters.batch_size", f"must be a multiple of per_device_train_batch_size ({micro})"
        )
    params["hyperparameters.gradient_accumulation_steps"] = "hyperparameters.batch_size"
    accumulation = batch // micro if isinstance(micro, int) and micro >= 1 else batch
    return {"per_device_train_batch_size": micro, "gradient_accumulation_steps": accumulation}


def _learning_rate(
    value: Any, ours: dict[str, Any], params: dict[str, str], notes: dict[str, str]
) -> dict[str, Any]:
    """learning_rate_multiplier scales this service's base learning rate."""
    if value == "auto":
        return {}
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InvalidInput(
            "hyperparameters.learning_rate_multiplier", f"must be 'auto' or a number above 0; got {value!r}"
        )
    _conflict(ours, "learning_rate_multiplier", "learning_rate")
    base = _default("learning_rate")
    params["hyperparameters.learning_rate"] = "hyperparameters.learning_rate_multiplier"
    notes["hyperparameters.learning_rate"] = f"gives learning_rate {value * base:g} ({value:g} x {base:g})"
    return {"learning_rate": value * base}


def in_client_terms(exc: ServiceError, params: dict[str, str], notes: dict[str, str]) -> ServiceError:
    """The error with our field name replaced by the OpenAI param the client sent (`params`), and
    how we derived the refused value from it (`notes`)."""
    if exc.field not in params:
        return exc
    param = params[exc.field]
    note = notes.get(exc.field)
    detail = exc.message.removeprefix(f"{exc.field}: ")
    exc.message = f"{param}: {note + ': ' if note else ''}{detail}"
    exc.field, exc.args = param, (exc.message,)
    return exc


# --- mapping: ours -> OpenAI objects -------------------------------------------------------------------


def file_object(record: FilePublic) -> FileObject:
    return FileObject(
        id=record.id,
        bytes=record.bytes,
        created_at=unix_time(record.created_at),
        filename=record.filename,
        purpose=record.purpose,
    )


def openai_hyperparameters(config: dict[str, Any]) -> OpenAIHyperparameters:
    epochs = config["num_train_epochs"]
    return OpenAIHyperparameters(
        n_epochs=(int(epochs) if float(epochs).is_integer() else epochs)
        if config["max_steps"] == 0
        else None,
        batch_size=config["per_device_train_batch_size"] * config["gradient_accumulation_steps"],
        learning_rate_multiplier=round(config["learning_rate"] / _default("learning_rate"), 6),
        **{name: config[name] for name in _SHOWN_CONFIG if name in config},
    )


def job_object(job: JobPublic, *, now: float | None = None) -> FineTuningJob:
    """A native job as OpenAI's fine_tuning.job. `now` (Unix seconds) dates estimated_finish."""
    hyperparameters = openai_hyperparameters(job.hyperparameters)
    adapter = job.adapter
    trained = (adapter.manifest.get("metrics") or {}).get("tokens") if adapter else None
    running = job.status == "running" and job.eta_s is not None
    return FineTuningJob(
        id=job.id,
        created_at=unix_time(job.created_at),
        finished_at=unix_time(job.finished_at) if job.finished_at else None,
        error=_job_error(job),
        fine_tuned_model=adapter.name if adapter else None,
        hyperparameters=hyperparameters,
        method=FineTuningMethod(supervised=SupervisedMethod(hyperparameters=hyperparameters)),
        model=job.base_model,
        seed=job.hyperparameters["seed"],
        status=job.status,
        trained_tokens=int(trained) if trained is not None else None,
        training_file=job.file_id or job.dataset,
        validation_file=job.hyperparameters.get("eval_dataset"),  # a reference: file id or sample:<name>
        estimated_finish=int((now or time.time()) + (job.eta_s or 0)) if running else None,
        metadata=job.metadata or None,
        user_provided_suffix=job.name,
    )


def _job_error(job: JobPublic) -> FineTuningError | None:
    if job.error is None:
        return None
    param = "training_file" if job.error.code == "invalid_dataset" else None
    return FineTuningError(code=job.error.code, message=job.error.message, param=param)


def event_object(event: JobEventPublic) -> FineTuningJobEvent:
    data = dict(event.data or {})
    if event.kind in ("metrics", "eval"):
        if data.get("loss") is not None:
            data["train_loss"] = data["loss"]
        if data.get("eval_loss") is not None:
            data["valid_loss"] = data["eval_loss"]
        return FineTuningJobEvent(
            id=event_id(event.id),
            created_at=unix_time(event.created_at),
            level="info",
            message=event.message or _metrics_message(event.step, data),
            type="metrics",
            data=data,
        )
    failed = event.kind == "status" and (event.message or "").startswith("failed")
    return FineTuningJobEvent(
        id=event_id(event.id),
        created_at=unix_time(event.created_at),
        level="error" if failed else "info",
        message=event.message or f"{event.kind} at step {event.step}",
        type="message",
        data=data or None,
    )


def _metrics_message(step: int | None, data: dict[str, Any]) -> str:
    total = f"/{data['total_steps']}" if data.get("total_steps") else ""
    losses = [
        f"{label} loss={data[key]:.4f}"
        for key, label in (("train_loss", "training"), ("valid_loss", "validation"))
        if data.get(key) is not None
    ]
    return f"Step {step}{total}: {', '.join(losses) or 'metrics'}"


def event_id(native: int) -> str:
    return f"ftevent-{native}"


def native_event_id(after: str | None) -> int | None:
    """The native event id for an OpenAI `after` (None: from the newest)."""
    if after is None:
        return None
    number = _cursor_number(after.removeprefix("ftevent-"))
    if number is None:
        raise InvalidInput(
            "after", f"must be an event id like ftevent-42 from an earlier page; got {after!r}"
        )
    return number


def _cursor_number(text: str) -> int | None:
    """A cursor's number, or None: ASCII digits only (str.isdigit also takes '²', which int() refuses),
    at most MAX_EVENT_ID (the databases' bigint; a larger one would fail in the driver)."""
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_EVENT_ID:
        return None
    return int(text)


def checkpoint_object(job_id: str, checkpoint: CheckpointPublic) -> FineTuningJobCheckpoint:
    metrics = checkpoint.metrics or {}
    return FineTuningJobCheckpoint(
        id=checkpoint_id(job_id, checkpoint.step),
        created_at=unix_time(checkpoint.created_at),
        fine_tuned_model_checkpoint=f"{job_id}:ckpt-step-{checkpoint.step}",
        fine_tuning_job_id=job_id,
        metrics=CheckpointMetrics(
            step=checkpoint.step, train_loss=metrics.get("loss"), valid_loss=metrics.get("eval_loss")
        ),
        step_number=checkpoint.step,
    )


def checkpoint_id(job_id: str, step: int) -> str:
    return f"ftckpt_{job_id.removeprefix('ftjob_')}_{step}"


def checkpoints_page(
    job_id: str, found: Sequence[CheckpointPublic], *, after: str | None, limit: int
) -> OpenAIIdList[FineTuningJobCheckpoint]:
    """Newest first, as OpenAI lists them; `after` is the last checkpoint id of the previous page."""
    newest = sorted(found, key=lambda c: c.step, reverse=True)
    if after is not None:
        prefix = checkpoint_id(job_id, 0)[:-1]
        step = _cursor_number(after.removeprefix(prefix))
        if not after.startswith(prefix) or step is None:
            raise InvalidInput("after", f"must be a checkpoint id of this job like {prefix}10; got {after!r}")
        newest = [c for c in newest if c.step < step]
    return id_listing([checkpoint_object(job_id, c) for c in newest[:limit]], len(newest) > limit)


def listing(data: list[M], has_more: bool) -> OpenAIList[M]:
    return OpenAIList(data=data, has_more=has_more)


def id_listing(data: list[M], has_more: bool) -> OpenAIIdList[M]:
    first, last = (getattr(data[0], "id", None), getattr(data[-1], "id", None)) if data else (None, None)
    return OpenAIIdList(data=data, has_more=has_more, first_id=first, last_id=last)


# --- routes ------------------------------------------------------------------------------------------


class FineTuningRoute(OpenAIRoute):
    """OpenAI's error body (OpenAIRoute), and OpenAI's 400 where the native routes answer 422."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            response = await handler(request)
            if response.status_code == 422:
                response.status_code = 400
            return response

        return wrapped


# Scopes per route, as on each route's native twin: `read` to look, `train` to upload, start or cancel.
router = APIRouter(prefix="/v1", tags=["openai fine-tuning"], route_class=FineTuningRoute)
PAGE_MAX = 100  # the native lists' largest page; a larger `limit` gets this many and has_more


@router.post("/files", response_model=FileObject)
def create_file(
    file: UploadFile,
    request: Request,
    session: WriteSessionDep,
    settings: SettingsDep,
    key: TrainKey,
    purpose: Annotated[str, Form(max_length=32)],
) -> FileObject:
    """Upload a JSONL training file (purpose fine-tune). A bad row is refused now, with its number."""
    if purpose != FINE_TUNE:
        raise InvalidInput("purpose", f"must be {FINE_TUNE!r}: this server only fine-tunes; got {purpose!r}")
    record = files.upload_file(file, request, session, settings, key, purpose)
    return file_object(FilePublic.model_validate(record))


@router.get("/files", response_model=OpenAIIdList[FileObject])
def list_files(
    session: SessionDep,
    key: ReadKey,
    after: Annotated[str | None, Query(description="Last id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1)] = 10_000,
    order: Annotated[Literal["desc"], Query(description="Newest first; the only order.")] = "desc",
) -> OpenAIIdList[FileObject]:
    """Uploaded files, newest first."""
    page = files.list_files(session, key, after=after, limit=min(limit, PAGE_MAX))
    data = [file_object(FilePublic.model_validate(row)) for row in page["data"]]  # type: ignore[attr-defined]
    return id_listing(data, bool(page["has_more"]))


@router.get("/files/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, session: SessionDep, key: ReadKey) -> FileObject:
    """One uploaded file."""
    return file_object(FilePublic.model_validate(files.get_file(file_id, session, key)))


@router.get("/files/{file_id}/content", response_class=FileResponse, responses=files.CONTENT_RESPONSE)
def retrieve_file_content(file_id: str, session: SessionDep, key: ReadKey) -> FileResponse:
    """One uploaded file's bytes, as uploaded."""
    return files.content_response(files.get_file(file_id, session, key))


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, session: WriteSessionDep, key: TrainKey) -> FileDeleted:
    """Delete a file; refused (409) while a queued or running job uses it."""
    files.delete_file(file_id, session, key)
    return FileDeleted(id=file_id)


@router.post("/fine_tuning/jobs", response_model=FineTuningJob)
def create_job(
    body: FineTuningJobCreate,
    request: Request,
    response: Response,
    session: WriteSessionDep,
    settings: SettingsDep,
    key: TrainKey,
    idempotency_key: Annotated[str | None, Header(max_length=255, description="Retry-safe submit.")] = None,
) -> FineTuningJob:
    """Queue a fine-tuning job; its datasets and hyperparameters are checked now (no validating_files)."""
    wanted = job_request(body)
    try:
        job = jobs.create_job(wanted.body, request, response, session, settings, key, idempotency_key)
    except ServiceError as exc:
        raise in_client_terms(exc, wanted.params, wanted.notes) from None
    response.status_code = 200  # OpenAI answers 200, repeat or not
    return job_object(job)


@router.get("/fine_tuning/jobs", response_model=OpenAIList[FineTuningJob])
def list_jobs(
    request: Request,
    session: SessionDep,
    key: ReadKey,
    after: Annotated[str | None, Query(description="Last job id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1)] = 20,
) -> OpenAIList[FineTuningJob]:
    """Jobs, newest first; `metadata[<key>]=<value>` keeps those whose metadata has every pair."""
    page = jobs.list_jobs(request, session, key, status_=None, after=after, limit=min(limit, PAGE_MAX))
    return listing([job_object(job) for job in page["data"]], page["has_more"])


@router.get("/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
def retrieve_job(job_id: str, session: SessionDep, key: ReadKey) -> FineTuningJob:
    """A job's status, fine_tuned_model once it succeeded, error once it failed."""
    return job_object(jobs.get_job(job_id, session, key))


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
def cancel_job(job_id: str, session: WriteSessionDep, key: TrainKey) -> FineTuningJob:
    """Cancel: a queued job at once; a running one within seconds (it reads `running` until then)."""
    return job_object(jobs.cancel_job(job_id, session, key))


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=OpenAIList[FineTuningJobEvent])
def list_events(
    job_id: str,
    session: SessionDep,
    key: ReadKey,
    after: Annotated[str | None, Query(description="Last event id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1)] = 20,
) -> OpenAIList[FineTuningJobEvent]:
    """Status changes and log lines (type message), per-step losses (type metrics); newest first."""
    jobs.get_job(job_id, session, key)
    page = queue.list_events(
        session, job_id, after=native_event_id(after), limit=min(limit, 1000), kind=None, newest_first=True
    )
    return listing([event_object(JobEventPublic.model_validate(row)) for row in page.rows], page.has_more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", response_model=OpenAIIdList[FineTuningJobCheckpoint])
def list_checkpoints(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    key: ReadKey,
    after: Annotated[str | None, Query(description="Last checkpoint id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1)] = 10,
) -> OpenAIIdList[FineTuningJobCheckpoint]:
    """The job's checkpoints on disk, newest first, with the losses logged at their step."""
    page = jobs.job_checkpoints(job_id, session, settings, key)
    return checkpoints_page(job_id, page["data"], after=after, limit=min(limit, PAGE_MAX))


@router.get("/models/{model:path}")
def retrieve_model(model: str, request: Request, session: SessionDep, key: ReadKey) -> dict[str, Any]:
    """The base model, or an adapter by name (a job's fine_tuned_model) or id."""
    base = request.app.state.engine.base_model_id
    if model == base:
        return {"id": base, "object": "model", "created": 0, "owned_by": "base"}
    try:
        adapter = adapters.get_adapter(model, session, key)
    except NotFound:
        raise NotFound(
            f"model {model!r} does not exist; GET /v1/models lists the base and every adapter", field="model"
        ) from None
    return model_object(adapter.name, unix_time(adapter.created_at), base)
