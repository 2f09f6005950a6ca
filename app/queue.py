"""The jobs and job_events tables: every job state change, each one guarded SQL, and their reads.

A transition is `UPDATE jobs ... WHERE id=:id AND status IN (...)` (plus the owning worker where one
owns the job); zero rows updated raises TransitionError, so two parties can never both move a job.
The claim is a single UPDATE over a sub-select: inside BEGIN IMMEDIATE on SQLite, and with the
sub-select's row locked FOR UPDATE SKIP LOCKED on PostgreSQL, so concurrent workers each take a
different job instead of queueing behind one row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import immediate_session, utcnow
from app.exceptions import Conflict, NotFound, TransitionError
from app.models import ACTIVE_STATUSES, FINAL_STATUSES, Job, JobEvent, JobStatus
from app.owners import may_see, where_owned
from app.pagination import PageRows, paginate

# --- creation ---------------------------------------------------------------------------------------


@dataclass
class NewJob:
    base_model: str
    dataset: str
    file_id: str | None
    config: dict[str, Any]
    name: str | None = None
    priority: int = 0
    metadata: dict[str, Any] | None = None
    max_attempts: int = 3
    api_key_id: str | None = None


def request_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def create_job(session: Session, new: NewJob, *, idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Insert a queued job; returns (job, created). A repeated Idempotency-Key returns the first job."""
    digest = request_hash(
        {
            "base_model": new.base_model,
            "dataset": new.dataset,
            "config": new.config,
            "name": new.name,
            "priority": new.priority,
            "metadata": new.metadata,
        }
    )
    # Scoped per API key: two callers picking the same Idempotency-Key each get their own job.
    scoped_key = scope_idempotency_key(idempotency_key, new.api_key_id) if idempotency_key else None
    if scoped_key and (found := _by_idempotency_key(session, scoped_key, digest)):
        return found, False
    job = Job(
        base_model=new.base_model,
        dataset=new.dataset,
        file_id=new.file_id,
        config=new.config,
        name=new.name,
        priority=new.priority,
        meta=new.metadata or {},
        max_attempts=new.max_attempts,
        idempotency_key=scoped_key,
        request_hash=digest,
        api_key_id=new.api_key_id,
    )
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # a concurrent request with the same key won the insert
        session.rollback()
        if scoped_key and (found := _by_idempotency_key(session, scoped_key, digest)):
            return found, False
        raise
    add_event(session, job.id, "status", message="queued")
    session.commit()
    return job, True


def scope_idempotency_key(key: str, api_key_id: str | None) -> str:
    """The stored form `<api key id>:<key>` (`-` without auth): the column's unique index then holds
    per API key, and still guards concurrent inserts in local mode, where a NULL key id would not."""
    return f"{api_key_id or '-'}:{key}"


def _by_idempotency_key(session: Session, key: str, digest: str) -> Job | None:
    job = session.scalar(select(Job).where(Job.idempotency_key == key))
    if job is not None and job.request_hash != digest:
        raise Conflict(
            "Idempotency-Key was already used for a different request; use a new key for a new job",
            field="Idempotency-Key",
        )
    return job


# --- reads ------------------------------------------------------------------------------------------


def get_job(session: Session, job_id: str, *, owner: str | None = None) -> Job:
    """The job, if `owner` may see it (app.owners); another key's job is as missing as no job."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or not may_see(job.api_key_id, owner):
        raise NotFound(f"job {job_id!r} does not exist", field="job_id")
    return job


def queue_position(session: Session, job: Job) -> int | None:
    """1-based place in the claim order (priority first, then age); None unless queued."""
    if job.status != JobStatus.QUEUED:
        return None
    ahead = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.status == JobStatus.QUEUED,
            or_(Job.priority > job.priority, and_(Job.priority == job.priority, Job.id < job.id)),
        )
    )
    return int(ahead or 0) + 1


def list_jobs(
    session: Session,
    *,
    status: str | None,
    after: str | None,
    limit: int,
    owner: str | None = None,
    metadata: dict[str, str] | None = None,
) -> PageRows:
    """Newest first; `after` is the last id of the previous page; `metadata`: only jobs whose metadata
    has every one of these pairs (compared in Python: SQLite's JSON paths cannot name every key, such
    as one with a quote or a non-ASCII letter, that the JSON column stores escaped)."""
    query = select(Job).where(where_owned(Job.api_key_id, owner))
    if status:
        query = query.where(Job.status == status)
    wanted = metadata or {}

    def matches(job: Job) -> bool:
        meta = job.meta or {}
        return all(meta.get(name) == value for name, value in wanted.items())

    return paginate(session, query, Job.id, after=after, limit=limit, keep=matches if wanted else None)


def list_events(
    session: Session,
    job_id: str,
    *,
    after: int | None,
    limit: int,
    kind: str | None,
    newest_first: bool = False,
) -> PageRows:
    """Oldest first (the native route) or newest first (OpenAI's order); `after`: the last event id seen."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if kind:
        query = query.where(JobEvent.kind == kind)
    return paginate(session, query, JobEvent.id, after=after, limit=limit, newest_first=newest_first)


def metrics_at(session: Session, job_id: str, steps: list[int]) -> dict[int, dict[str, Any]]:
    """The training metrics recorded at these steps (e.g. the checkpoints'), by step."""
    rows = session.scalars(
        select(JobEvent).where(
            JobEvent.job_id == job_id, JobEvent.kind == "metrics", JobEvent.step.in_(steps)
        )
    )
    return {row.step: row.data for row in rows if row.step is not None and row.data is not None}


def metrics_series(session: Session, job_id: str) -> list[tuple[int, dict[str, Any]]]:
    """Every training metrics record of a job as (step, data), in the order they were written."""
    query = (
        select(JobEvent.step, JobEvent.data)
        .where(JobEvent.job_id == job_id, JobEvent.kind == "metrics", JobEvent.step.is_not(None))
        .order_by(JobEvent.id)
    )
    return [(step, data or {}) for step, data in session.execute(query)]


def jobs_using_file(session: Session, file_id: str) -> Sequence[tuple[str, str | None]]:
    """Active jobs (id, owner) that read this upload, as their dataset or as
    hyperparameters.eval_dataset (both hold the file id: app.datasets resolves it to the stored path
    only when the data is read)."""
    uses = or_(Job.file_id == file_id, Job.config["eval_dataset"].as_string() == file_id)
    query = select(Job.id, Job.api_key_id).where(uses, Job.status.in_(ACTIVE_STATUSES))
    return [(job_id, owner) for job_id, owner in session.execute(query)]


# --- the guarded transition ---------------------------------------------------------------------------


def _transition(
    session: Session, job_id: str, allowed: Iterable[str], *, owner: str | None = None, **values: Any
) -> None:
    allowed = tuple(allowed)
    guard = [Job.id == job_id, Job.status.in_(allowed)]
    if owner is not None:
        guard.append(Job.worker_id == owner)
    result = session.execute(
        update(Job).where(*guard).values(updated_at=utcnow(), **values),
        execution_options={"synchronize_session": False},
    )
    if result.rowcount == 0:  # type: ignore[attr-defined]
        by = f" owned by {owner}" if owner else ""
        raise TransitionError(f"job {job_id} is not {'/'.join(allowed)}{by}; cannot set {sorted(values)}")


def add_event(
    session: Session,
    job_id: str,
    kind: str,
    *,
    message: str | None = None,
    step: int | None = None,
    data: dict[str, Any] | None = None,
    attempt: int = 0,
) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, message=message, step=step, data=data, attempt=attempt))


# --- worker side --------------------------------------------------------------------------------------


def claim_next(engine: Engine, worker_id: str, lease_s: float) -> Job | None:
    """Take the next queued job for `worker_id`, or None. One statement: nobody else can take it too."""
    now = utcnow()
    with immediate_session(engine) as session:
        next_id = (
            select(Job.id)
            .where(Job.status == JobStatus.QUEUED)
            .order_by(Job.priority.desc(), Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)  # PostgreSQL; SQLite's compiler leaves it out
            .scalar_subquery()
        )
        claimed = session.execute(
            update(Job)
            # The status guard again: should a claim ever run without the row lock, it cannot take a
            # job that another claim took after our sub-select read it.
            .where(Job.id == next_id, Job.status == JobStatus.QUEUED)
            .values(
                status=JobStatus.RUNNING,
                worker_id=worker_id,
                attempts=Job.attempts + 1,
                heartbeat_at=now,
                lease_until=now + timedelta(seconds=lease_s),
                started_at=func.coalesce(Job.started_at, now),
                updated_at=now,
            )
            .returning(Job.id, Job.attempts),
            execution_options={"synchronize_session": False},
        ).first()
        if claimed is None:
            return None
        add_event(
            session,
            claimed.id,
            "status",
            message=f"running on {worker_id} (attempt {claimed.attempts})",
            attempt=claimed.attempts,
        )
    with Session(engine, expire_on_commit=False) as session:
        return session.get(Job, claimed.id)


def heartbeat(session: Session, job_id: str, worker_id: str, lease_s: float) -> bool:
    """Extend the lease; returns whether a cancel was asked. TransitionError: the job isn't ours now."""
    now = utcnow()
    _transition(
        session,
        job_id,
        [JobStatus.RUNNING],
        owner=worker_id,
        heartbeat_at=now,
        lease_until=now + timedelta(seconds=lease_s),
    )
    session.commit()
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def requeue_expired(session: Session, max_lost_attempts: int) -> list[tuple[str, str]]:
    """Jobs whose worker stopped heartbeating: a lost attempt, not the job's fault, so back to the
    queue (resuming from the last checkpoint), or failed once it has lost `max_lost_attempts`.

    Returns (job id, new status) pairs. Each change is guarded on the expired lease, so a worker that
    heartbeats in the meantime keeps its job.
    """
    now = utcnow()
    stale = session.execute(
        select(Job.id, Job.attempts, Job.lost_attempts, Job.cancel_requested, Job.worker_id).where(
            Job.status == JobStatus.RUNNING, Job.lease_until < now
        )
    ).all()
    changed = []
    for job_id, attempts, lost, cancel, worker in stale:
        reason = f"worker {worker} stopped heartbeating during attempt {attempts}"
        values, status, reason = _lost_outcome(lost, max_lost_attempts, cancel, reason)
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.lease_until < now)
            .values(status=status, worker_id=None, lease_until=None, updated_at=now, **values),
            execution_options={"synchronize_session": False},
        )
        if result.rowcount:  # type: ignore[attr-defined]
            add_event(session, job_id, "status", message=f"{status}: {reason}", attempt=attempts)
            changed.append((job_id, status))
    session.commit()
    return changed


def requeue_lost(session: Session, job_id: str, worker_id: str, max_lost_attempts: int, why: str) -> str:
    """The worker saw its training child die without a result (killed, e.g. by the out-of-memory
    killer): a lost attempt like a lost worker. Returns the job's new status."""
    job = get_job(session, job_id)
    values, status, reason = _lost_outcome(job.lost_attempts, max_lost_attempts, job.cancel_requested, why)
    _transition(
        session,
        job_id,
        [JobStatus.RUNNING],
        owner=worker_id,
        status=status,
        worker_id=None,
        lease_until=None,
        **values,
    )
    add_event(session, job_id, "status", message=f"{status}: {reason}", attempt=job.attempts)
    session.commit()
    return status


def _lost_outcome(
    lost_before: int, max_lost_attempts: int, cancel: bool, reason: str
) -> tuple[dict[str, Any], str, str]:
    lost = lost_before + 1
    if cancel:
        return {"finished_at": utcnow(), "lost_attempts": lost}, JobStatus.CANCELLED, reason
    if lost >= max_lost_attempts:
        values = {
            "finished_at": utcnow(),
            "lost_attempts": lost,
            "error_code": "worker_lost",
            "error_message": f"{reason}; {lost} attempts lost to crashes, the limit (max_lost_attempts)",
        }
        return values, JobStatus.FAILED, reason
    more = f"lost attempt {lost} of at most {max_lost_attempts}; will resume from the last checkpoint"
    return {"lost_attempts": lost}, JobStatus.QUEUED, f"{reason}; {more}"


def owns(session: Session, job_id: str, worker_id: str, attempt: int) -> bool:
    """Whether `worker_id`'s attempt `attempt` still runs the job: the fence a training child checks
    before it writes a checkpoint, so an attempt whose lease was taken over never writes one."""
    found = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.id == job_id,
            Job.status == JobStatus.RUNNING,
            Job.worker_id == worker_id,
            Job.attempts == attempt,
        )
    )
    return bool(found)


def finish_succeeded(session: Session, job_id: str, worker_id: str, *, adapter_id: str, backend: str) -> None:
    _transition(
        session,
        job_id,
        [JobStatus.RUNNING],
        owner=worker_id,
        status=JobStatus.SUCCEEDED,
        adapter_id=adapter_id,
        backend=backend,
        finished_at=utcnow(),
        lease_until=None,
    )
    add_event(session, job_id, "status", message=f"succeeded: adapter {adapter_id}")
    session.commit()


def finish_failed(session: Session, job_id: str, worker_id: str, *, code: str, message: str) -> None:
    _transition(
        session,
        job_id,
        [JobStatus.RUNNING],
        owner=worker_id,
        status=JobStatus.FAILED,
        error_code=code,
        error_message=message,
        finished_at=utcnow(),
        lease_until=None,
    )
    add_event(session, job_id, "status", message=f"failed: {code}: {message}")
    session.commit()


# Failures that may not recur (a CUDA or driver error, a crash of the training process): retried from
# the last checkpoint while the job has attempts left. Any other code is the job's input or config,
# which a retry would only fail the same way.
RETRYABLE_FAILURES = frozenset({"training_error", "child_crashed"})


def fail_or_retry(session: Session, job_id: str, worker_id: str, *, code: str, message: str) -> str:
    """A failure of the job itself: queued again while it has failed fewer than `max_attempts` times
    (lost attempts, counted apart, do not count) and the failure may not recur; else failed. Returns
    the new status."""
    job = get_job(session, job_id)
    failed = job.attempts - job.lost_attempts  # this attempt included
    if code not in RETRYABLE_FAILURES or failed >= job.max_attempts or job.cancel_requested:
        finish_failed(session, job_id, worker_id, code=code, message=message)
        return JobStatus.FAILED
    retry = f"failed attempt {failed} of at most {job.max_attempts}; will resume from the last checkpoint"
    _back_to_queue(session, job_id, worker_id, f"{code}: {message}; {retry}", attempt=job.attempts)
    return JobStatus.QUEUED


def finish_cancelled(session: Session, job_id: str, worker_id: str) -> None:
    _transition(
        session,
        job_id,
        [JobStatus.RUNNING],
        owner=worker_id,
        status=JobStatus.CANCELLED,
        finished_at=utcnow(),
        lease_until=None,
    )
    add_event(session, job_id, "status", message="cancelled; checkpoints kept")
    session.commit()


def release(session: Session, job_id: str, worker_id: str, reason: str) -> None:
    """Hand a running job back to the queue (worker shutting down). Not counted as a failed attempt."""
    _back_to_queue(session, job_id, worker_id, reason, attempts=Job.attempts - 1)


def _back_to_queue(
    session: Session, job_id: str, worker_id: str, reason: str, *, attempt: int = 0, **values: Any
) -> None:
    """`worker_id`'s running job goes back to the queue, to resume from its last checkpoint."""
    _transition(
        session,
        job_id,
        [JobStatus.RUNNING],
        owner=worker_id,
        status=JobStatus.QUEUED,
        worker_id=None,
        lease_until=None,
        **values,
    )
    add_event(session, job_id, "status", message=f"queued again: {reason}", attempt=attempt)
    session.commit()


# --- API side -----------------------------------------------------------------------------------------


def request_cancel(session: Session, job_id: str, *, owner: str | None = None) -> Job:
    """Queued: cancelled at once. Running: flagged; its worker stops it in seconds, keeping checkpoints."""
    job = get_job(session, job_id, owner=owner)
    try:
        if job.status == JobStatus.QUEUED:
            _transition(session, job_id, [JobStatus.QUEUED], status=JobStatus.CANCELLED, finished_at=utcnow())
            add_event(session, job_id, "status", message="cancelled while queued")
        else:
            _transition(session, job_id, [JobStatus.RUNNING], cancel_requested=True)
            add_event(session, job_id, "status", message="cancel requested")
    except TransitionError:
        session.rollback()
        job = get_job(session, job_id)  # it moved meanwhile (claimed or finished): say where it is now
        if job.status in FINAL_STATUSES:
            raise Conflict(f"job {job_id} already {job.status}; nothing to cancel", field="job_id") from None
        return request_cancel(session, job_id, owner=owner)
    session.commit()
    return get_job(session, job_id)


# --- progress (written by the child process) -----------------------------------------------------------

_PROGRESS_KEYS = {"step", "total_steps", "epoch", "train_loss", "eval_loss", "tokens_per_s", "eta_s"}


def record_step(session: Session, job_id: str, worker_id: str, attempt: int, metrics: dict[str, Any]) -> bool:
    """Store one step's metrics as an event and on the job row; returns False once the job isn't ours.

    Training records are kind "metrics", evaluation records (no train loss) kind "eval". A resumed
    attempt repeats the steps after its checkpoint; the earlier attempt's records of those steps are
    replaced, so the events hold each step exactly once.
    """
    step = int(metrics["step"])
    train_loss = metrics.get("loss", metrics.get("train_loss"))  # the trainer says "loss"
    kind = "eval" if train_loss is None and metrics.get("eval_loss") is not None else "metrics"
    values = {k: metrics[k] for k in _PROGRESS_KEYS if metrics.get(k) is not None}
    if kind == "metrics" and train_loss is not None:
        values["train_loss"] = train_loss
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == JobStatus.RUNNING,
            Job.worker_id == worker_id,
            Job.attempts == attempt,  # the same fence as owns(): a taken-over attempt records nothing
        )
        .values(updated_at=utcnow(), **values),
        execution_options={"synchronize_session": False},
    )
    if result.rowcount == 0:  # type: ignore[attr-defined]
        session.rollback()
        return False
    session.execute(
        delete(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == kind, JobEvent.step >= step)
    )
    add_event(session, job_id, kind, step=step, data=metrics, attempt=attempt)
    session.commit()
    return True


def record_total_steps(session: Session, job_id: str, worker_id: str, total_steps: int) -> bool:
    """Returns False once the job isn't ours (requeued, cancelled): the caller then stops."""
    return _record_owned(session, job_id, worker_id, total_steps=total_steps)


def record_backend(session: Session, job_id: str, worker_id: str, backend: str) -> bool:
    """Set as soon as the child knows it, so running, failed and cancelled jobs show it too."""
    return _record_owned(session, job_id, worker_id, backend=backend)


def _record_owned(session: Session, job_id: str, worker_id: str, **values: Any) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.worker_id == worker_id)
        .values(updated_at=utcnow(), **values),
        execution_options={"synchronize_session": False},
    )
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


# --- read at /metrics scrape time and by the inference engine's GPU-release probe ------------------


def status_counts(session: Session) -> dict[str, int]:
    """Jobs per status (statuses with no job are absent)."""
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    return {status: int(count) for status, count in rows}


def any_job_running(session: Session) -> bool:
    return session.scalar(select(Job.id).where(Job.status == "running").limit(1)) is not None


def running_tokens_per_s(session: Session) -> float:
    """Training throughput of the running jobs (each one's latest step), summed."""
    total = session.scalar(select(func.sum(Job.tokens_per_s)).where(Job.status == "running"))
    return float(total or 0.0)


def finished_job_durations(session: Session) -> list[tuple[str, float]]:
    """(final status, seconds from start to finish) of every job that ran to an end. The difference is
    taken in Python: date arithmetic differs between SQL dialects (SQLite has only julianday)."""
    rows = session.execute(
        select(Job.status, Job.started_at, Job.finished_at).where(
            Job.finished_at.is_not(None), Job.started_at.is_not(None)
        )
    ).all()
    return [
        (status, (finished - started).total_seconds())
        for status, started, finished in rows
        if started is not None and finished is not None
    ]
