"""Fine-tuning jobs: submit, inspect, list, cancel, follow events, list checkpoints."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, status
from sqlalchemy.orm import Session

from app import datasets, queue, registry
from app.api.deps import ReadKey, SessionDep, SettingsDep, TrainKey, WriteSessionDep, key_id, owner_of
from app.config import TINY_MODEL_ID, Settings
from app.exceptions import InvalidInput
from app.ml.train_config import TrainConfig
from app.models import Job
from app.pagination import MAX_EVENT_ID
from app.schemas import (
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE,
    AdapterPublic,
    CheckpointPublic,
    JobCreate,
    JobError,
    JobEventPublic,
    JobProgress,
    JobPublic,
    JobStatus,
    Page,
)

router = APIRouter(prefix="/jobs", tags=["jobs"])
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    responses={200: {"description": "A repeat of an earlier request with the same Idempotency-Key."}},
)
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    session: WriteSessionDep,
    settings: SettingsDep,
    _key: TrainKey,
    idempotency_key: Annotated[str | None, Header(max_length=255, description="Retry-safe submit.")] = None,
) -> JobPublic:
    """Queue a fine-tuning job. The dataset and every hyperparameter are checked now, not an hour from now."""
    base_model = _base_model(body.base_model, settings)
    owner = owner_of(_key)
    dataset = datasets.reference(session, body.dataset, owner=owner)
    config = build_config(session, settings, body, base_model, dataset, owner=owner)
    datasets.check_job(session, config, settings)
    new = queue.NewJob(
        base_model=base_model,
        dataset=dataset,
        file_id=datasets.file_id(dataset),
        config=config,
        name=body.suffix,
        priority=body.priority,
        metadata=body.metadata,
        max_attempts=settings.max_attempts,
        api_key_id=key_id(_key),
    )
    job, created = queue.create_job(session, new, idempotency_key=idempotency_key)
    if not created:
        response.status_code = status.HTTP_200_OK
    return job_public(session, job)


def _base_model(requested: str | None, settings: Settings) -> str:
    """The server's default, or a hub id; server folders only as configured by the operator."""
    if requested is None or requested in (settings.base_model, settings.resolved_base_model(), TINY_MODEL_ID):
        return requested or settings.resolved_base_model()
    if not HUB_ID.fullmatch(requested) or ".." in requested:
        raise InvalidInput(
            "base_model", "must be a hub id like owner/name (server paths are set by GPTOSS_BASE_MODEL)"
        )
    return requested


def build_config(
    session: Session,
    settings: Settings,
    body: JobCreate,
    base_model: str,
    dataset: str,
    *,
    owner: str | None = None,
) -> dict[str, Any]:
    """The job's TrainConfig: the client's hyperparameters (validated with the request) plus the fields
    the server and the job own. Datasets are stored as references (see app.datasets), never paths."""
    hyper = body.hyperparameters
    eval_ref = None
    if hyper.eval_dataset:
        eval_ref = datasets.reference(session, hyper.eval_dataset, field=datasets.EVAL_FIELD, owner=owner)
    owned: dict[str, Any] = {
        "base_model": base_model,
        "dataset": dataset,
        "eval_dataset": eval_ref,
        "backend": settings.backend,
        "load_in_4bit": settings.load_in_4bit,
        "max_rows": settings.max_dataset_rows,
        "max_bytes": settings.max_upload_bytes,
    }
    if body.seed is not None:
        owned["seed"] = body.seed
    return TrainConfig(**{**hyper.model_dump(), **owned}).model_dump(mode="json")


@router.get("", response_model=Page[JobPublic])
def list_jobs(
    request: Request,
    session: SessionDep,
    _key: ReadKey,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    after: Annotated[
        str | None, Query(pattern=r"^ftjob_[0-9a-f]+$", description="Last id of the previous page.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    """Jobs, newest first, optionally only those in one status, or (`metadata[<key>]=<value>`, as
    OpenAI's client sends it, repeatable) only those whose metadata has every pair given."""
    page = queue.list_jobs(
        session,
        status=status_,
        after=after,
        limit=limit,
        owner=owner_of(_key),
        metadata=metadata_filter(request),
    )
    return page.as_page([job_public(session, job) for job in page.rows])


def metadata_filter(request: Request) -> dict[str, str] | None:
    """The `metadata[<key>]=<value>` query parameters (OpenAI's deepObject form) as a dict, checked
    against the limits metadata is stored with; None when there are none."""
    pairs: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name == "metadata" or (name.startswith("metadata[") and not name.endswith("]")):
            raise InvalidInput("metadata", "filter as metadata[<key>]=<value>, e.g. metadata[team]=research")
        if not name.startswith("metadata["):
            continue
        key = name[len("metadata[") : -1]
        if not key or len(key) > 64 or len(value) > MAX_METADATA_VALUE:
            raise InvalidInput(
                "metadata", f"keys are 1-64 characters and values at most {MAX_METADATA_VALUE}; got {key!r}"
            )
        pairs[key] = value
    if len(pairs) > MAX_METADATA_KEYS:
        raise InvalidInput("metadata", f"at most {MAX_METADATA_KEYS} pairs")
    return pairs or None


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, session: SessionDep, _key: ReadKey) -> JobPublic:
    """A job's status, progress, latest losses, speed, ETA, queue position, error or adapter."""
    return job_public(session, queue.get_job(session, job_id, owner=owner_of(_key)))


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, session: WriteSessionDep, _key: TrainKey) -> JobPublic:
    """Cancel: a queued job at once; a running one within seconds, keeping its checkpoints."""
    return job_public(session, queue.request_cancel(session, job_id, owner=owner_of(_key)))


@router.get("/{job_id}/events", response_model=Page[JobEventPublic])
def job_events(
    job_id: str,
    session: SessionDep,
    _key: ReadKey,
    after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID, description="Last event id already seen.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    kind: Annotated[str | None, Query(pattern="^(log|metrics|eval|checkpoint|status)$")] = None,
) -> dict[str, Any]:
    """Log lines, per-step metrics, checkpoints and status changes, oldest first."""
    queue.get_job(session, job_id, owner=owner_of(_key))
    return queue.list_events(session, job_id, after=after, limit=limit, kind=kind).as_page()


@router.get("/{job_id}/checkpoints", response_model=Page[CheckpointPublic])
def job_checkpoints(job_id: str, session: SessionDep, settings: SettingsDep, _key: ReadKey) -> dict[str, Any]:
    """The checkpoints on disk (the trainer may rotate old ones), with the metrics logged at their step."""
    queue.get_job(session, job_id, owner=owner_of(_key))
    found = list_checkpoints(settings, job_id)
    metrics = queue.metrics_at(session, job_id, [step for step, _ in found])
    data = [
        CheckpointPublic(
            step=step,
            path=str(path),
            metrics=metrics.get(step),
            created_at=datetime.fromtimestamp(path.stat().st_mtime, UTC).replace(tzinfo=None),
        )
        for step, path in found
    ]
    return {"data": data, "has_more": False}


def list_checkpoints(settings: Settings, job_id: str) -> list[tuple[int, Path]]:
    folder = settings.jobs_dir / job_id / "checkpoints"
    found = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else []:
        if match := re.fullmatch(r"checkpoint-(\d+)", path.name):
            found.append((int(match.group(1)), path))
    return sorted(found)


def job_public(session: Session, job: Job) -> JobPublic:
    adapter = registry.get_adapter(session, job.adapter_id) if job.adapter_id else None
    error = JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None
    return JobPublic(
        id=job.id,
        name=job.name,
        status=JobStatus(job.status),
        base_model=job.base_model,
        dataset=job.dataset,
        file_id=job.file_id,
        hyperparameters=job.config,
        metadata=job.meta,
        priority=job.priority,
        progress=JobProgress(step=job.step, total_steps=job.total_steps, epoch=job.epoch),
        train_loss=job.train_loss,
        eval_loss=job.eval_loss,
        tokens_per_s=job.tokens_per_s,
        eta_s=job.eta_s,
        queue_position=queue.queue_position(session, job),
        backend=job.backend,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        lost_attempts=job.lost_attempts or 0,
        cancel_requested=job.cancel_requested,
        error=error,
        adapter_id=job.adapter_id,
        adapter=AdapterPublic.model_validate(adapter) if adapter else None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )
