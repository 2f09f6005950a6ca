"""The queue's guarded statements, straight against a real SQLite file and a real PostgreSQL database
(no training here)."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta

import pytest
from sqlalchemy import update

from app import queue
from app.config import Settings
from app.db import current_revision, head_revision, make_engine, make_sessionmaker, upgrade_to_head, utcnow
from app.exceptions import TransitionError
from app.models import Job
from tests.fixtures_service import StartWorker
from tests.pg import ON_BOTH_DATABASES, SQLITE_ONLY


def _new_jobs(settings: Settings, count: int, **fields: object) -> list[str]:
    sessions = make_sessionmaker(make_engine(settings))
    ids = []
    with sessions() as session:
        for _ in range(count):
            new = queue.NewJob(
                base_model="tiny-gpt-oss", dataset="sample:capitals", file_id=None, config={}, **fields
            )  # type: ignore[arg-type]
            ids.append(queue.create_job(session, new)[0].id)
    return ids


def _claim_all(settings: Settings, worker_id: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """One competing worker: claim until the queue is empty."""
    engine = make_engine(settings)
    claimed = []
    while (job := queue.claim_next(engine, worker_id, lease_s=60)) is not None:
        claimed.append(job.id)
    out.put((worker_id, claimed))


@ON_BOTH_DATABASES
def test_many_workers_claim_each_job_exactly_once(svc_settings: Settings) -> None:
    """4 workers x 40 jobs: PostgreSQL's SKIP LOCKED and SQLite's BEGIN IMMEDIATE each hand every job
    to exactly one of them."""
    upgrade_to_head(svc_settings)
    ids = _new_jobs(svc_settings, 160)
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_claim_all, args=(svc_settings, f"w{i}", out)) for i in range(4)]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    claimed = [job_id for jobs in results.values() for job_id in jobs]
    assert sorted(claimed) == sorted(ids)  # every job once: none lost, none twice
    with make_sessionmaker(make_engine(svc_settings))() as session:
        for worker_id, jobs in results.items():
            for job_id in jobs:
                job = queue.get_job(session, job_id)
                assert (job.status, job.worker_id, job.attempts) == ("running", worker_id, 1)


@ON_BOTH_DATABASES
def test_claim_order_is_priority_then_age(svc_settings: Settings) -> None:
    upgrade_to_head(svc_settings)
    old, new = _new_jobs(svc_settings, 2)
    (urgent,) = _new_jobs(svc_settings, 1, priority=3)
    engine = make_engine(svc_settings)
    order = [queue.claim_next(engine, "w", 60) for _ in range(4)]
    assert [job.id if job else None for job in order] == [urgent, old, new, None]


@ON_BOTH_DATABASES
def test_expired_lease_is_a_lost_attempt_requeued_until_max_lost_attempts(svc_settings: Settings) -> None:
    """A lost worker is not the job's fault: max_attempts (1 here) does not fail it, the separate
    crash-loop limit does."""
    upgrade_to_head(svc_settings)
    (job_id,) = _new_jobs(svc_settings, 1, max_attempts=1)
    engine = make_engine(svc_settings)
    sessions = make_sessionmaker(engine)

    def claim_and_expire(worker: str) -> None:
        assert queue.claim_next(engine, worker, 60) is not None
        with sessions() as session:
            assert queue.requeue_expired(session, max_lost_attempts=3) == []  # a live lease stays
            session.execute(update(Job).values(lease_until=utcnow() - timedelta(seconds=1)))
            session.commit()

    for lost, worker in enumerate(("dead-1", "dead-2"), start=1):
        claim_and_expire(worker)
        with sessions() as session:
            assert queue.requeue_expired(session, max_lost_attempts=3) == [(job_id, "queued")]
            assert queue.get_job(session, job_id).lost_attempts == lost
            with pytest.raises(TransitionError):  # the dead worker cannot finish a job it lost
                queue.finish_succeeded(session, job_id, worker, adapter_id="adp_x", backend="hf")
    claim_and_expire("dead-3")
    with sessions() as session:
        assert queue.requeue_expired(session, max_lost_attempts=3) == [(job_id, "failed")]
        job = queue.get_job(session, job_id)
        assert (job.attempts, job.lost_attempts, job.error_code) == (3, 3, "worker_lost")
        assert "max_lost_attempts" in (job.error_message or "")


@ON_BOTH_DATABASES
def test_only_the_attempt_that_runs_a_job_owns_it(svc_settings: Settings) -> None:
    """The fence a training child checks before each checkpoint."""
    upgrade_to_head(svc_settings)
    (job_id,) = _new_jobs(svc_settings, 1)
    engine = make_engine(svc_settings)
    sessions = make_sessionmaker(engine)
    first = queue.claim_next(engine, "w1", 60)
    assert first is not None
    with sessions() as session:
        assert queue.owns(session, job_id, "w1", first.attempts)
        session.execute(update(Job).values(lease_until=utcnow() - timedelta(seconds=1)))
        session.commit()
        queue.requeue_expired(session, max_lost_attempts=5)
    second = queue.claim_next(engine, "w2", 60)
    assert second is not None
    with sessions() as session:
        assert not queue.owns(session, job_id, "w1", first.attempts)
        assert queue.owns(session, job_id, "w2", second.attempts)
        assert not queue.owns(session, job_id, "w2", first.attempts)


@ON_BOTH_DATABASES
def test_transitions_are_guarded_on_status_and_owner(svc_settings: Settings) -> None:
    upgrade_to_head(svc_settings)
    (job_id,) = _new_jobs(svc_settings, 1)
    engine = make_engine(svc_settings)
    sessions = make_sessionmaker(engine)
    with sessions() as session, pytest.raises(TransitionError):
        queue.finish_failed(session, job_id, "w1", code="x", message="queued jobs cannot fail")
    assert queue.claim_next(engine, "w1", 60) is not None
    with sessions() as session:
        with pytest.raises(TransitionError):
            queue.heartbeat(session, job_id, "someone-else", 60)
        assert queue.heartbeat(session, job_id, "w1", 60) is False
        queue.request_cancel(session, job_id)
        assert queue.heartbeat(session, job_id, "w1", 60) is True  # the worker learns of the cancel
        queue.finish_cancelled(session, job_id, "w1")
        with pytest.raises(TransitionError):
            queue.finish_succeeded(session, job_id, "w1", adapter_id="adp_x", backend="hf")
        assert queue.get_job(session, job_id).status == "cancelled"


@ON_BOTH_DATABASES
def test_resumed_steps_replace_the_abandoned_attempts_records(svc_settings: Settings) -> None:
    upgrade_to_head(svc_settings)
    (job_id,) = _new_jobs(svc_settings, 1)
    engine = make_engine(svc_settings)
    sessions = make_sessionmaker(engine)
    queue.claim_next(engine, "w1", 60)
    with sessions() as session:
        for step in (1, 2, 3):
            assert queue.record_step(session, job_id, "w1", 1, {"step": step, "loss": 1.0 / step})
        assert not queue.record_step(session, job_id, "intruder", 1, {"step": 4, "loss": 0.1})
        # Attempt 2 resumed from the checkpoint at step 2: step 3 is done again.
        session.execute(update(Job).values(worker_id="w2", attempts=2))
        session.commit()
        assert queue.record_step(session, job_id, "w2", 2, {"step": 3, "loss": 0.3})
        # The same worker's earlier attempt (its child outlived the takeover) records nothing more.
        session.execute(update(Job).values(worker_id="w1"))
        session.commit()
        assert not queue.record_step(session, job_id, "w1", 1, {"step": 3, "loss": 0.9})
        events = queue.list_events(session, job_id, after=0, limit=100, kind="metrics").rows
        assert [(e.step, e.attempt) for e in events] == [(1, 1), (2, 1), (3, 2)]
        assert queue.get_job(session, job_id).train_loss == 0.3


@ON_BOTH_DATABASES
def test_worker_once_on_an_empty_queue_migrates_and_exits(
    svc_settings: Settings, start_worker: StartWorker
) -> None:
    worker = start_worker("--once", "--worker-id", "solo")
    assert worker.wait(timeout=120) == 0
    assert current_revision(make_engine(svc_settings)) == head_revision()  # it migrated the empty database


@SQLITE_ONLY
def test_a_locked_database_does_not_cost_a_running_job_its_lease(
    svc_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from app import db
    from workers.worker import Supervision, Worker

    monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 100)  # give up on the lock quickly: this test waits for it
    upgrade_to_head(svc_settings)
    worker = Worker(svc_settings, "w-locked")
    (job_id,) = _new_jobs(svc_settings, 1)
    job = queue.claim_next(worker.db, worker.worker_id, lease_s=60)
    assert job is not None and job.id == job_id
    seen = Supervision()
    blocker = sqlite3.connect(svc_settings.data_dir / "service.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock past busy_timeout
    try:
        assert worker._beat(job, seen) is None  # logged and retried later, not raised
    finally:
        blocker.rollback()
        blocker.close()
    assert worker._beat(job, seen) is False and not seen.lost  # the next tick renews the lease
    with make_sessionmaker(worker.db)() as session:
        assert queue.get_job(session, job_id).status == "running"


@ON_BOTH_DATABASES
def test_failures_of_the_job_itself_are_retried_up_to_max_attempts(svc_settings: Settings) -> None:
    """A training error is retried (resuming from the checkpoint) until max_attempts attempts failed;
    lost attempts do not count; a bad config fails at once."""
    upgrade_to_head(svc_settings)
    flaky, bad = _new_jobs(svc_settings, 2, max_attempts=2)
    engine = make_engine(svc_settings)
    sessions = make_sessionmaker(engine)

    def claim(job_id: str) -> None:
        job = queue.claim_next(engine, "w1", 60)
        assert job is not None and job.id == job_id

    claim(flaky)
    with sessions() as session:
        assert (
            queue.fail_or_retry(session, flaky, "w1", code="training_error", message="CUDA error") == "queued"
        )
    claim(flaky)
    with sessions() as session:  # a lost attempt between the two failures is not the job's
        assert queue.requeue_lost(session, flaky, "w1", 30, "killed by SIGKILL") == "queued"
    claim(flaky)
    with sessions() as session:
        assert queue.fail_or_retry(session, flaky, "w1", code="training_error", message="again") == "failed"
        job = queue.get_job(session, flaky)
        assert (job.attempts, job.lost_attempts, job.error_code) == (3, 1, "training_error")
        messages = [
            e.message for e in queue.list_events(session, flaky, after=0, limit=50, kind="status").rows
        ]
        assert any("failed attempt 1 of at most 2" in (m or "") for m in messages)
    claim(bad)
    with sessions() as session:
        assert (
            queue.fail_or_retry(session, bad, "w1", code="invalid_job", message="no such module") == "failed"
        )
