"""The schema comes only from Alembic: upgrade an empty database to head, match the models, go back down;
on SQLite and on PostgreSQL (the same migrations: types, JSON, booleans, defaults, id lengths)."""

from __future__ import annotations

import json
import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from app import datasets
from app.config import Settings
from app.db import current_revision, downgrade_to, head_revision, make_engine, upgrade_to_head
from app.models import Base, Job, ServiceIdentity
from tests.fixtures_service import ROOT, worker_env
from tests.pg import ON_BOTH_DATABASES

TABLES = {"files", "jobs", "job_events", "adapters", "api_keys", "service_identity"}


@ON_BOTH_DATABASES
def test_upgrade_to_head_then_downgrade_to_empty(svc_settings: Settings) -> None:
    engine = make_engine(svc_settings)
    assert current_revision(engine) is None
    upgrade_to_head(svc_settings)
    assert current_revision(engine) == head_revision()
    assert set(inspect(engine).get_table_names()) >= TABLES
    with engine.connect() as conn:  # the migrations build exactly what the models describe
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        if engine.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert len(conn.execute(select(ServiceIdentity.id)).all()) == 1  # the database's id
    downgrade_to(svc_settings, "base")
    engine.dispose()
    assert not TABLES & set(inspect(engine).get_table_names())
    assert current_revision(engine) is None
    upgrade_to_head(svc_settings)  # and back up again
    assert current_revision(engine) == head_revision()


@ON_BOTH_DATABASES
def test_a_downgrade_and_upgrade_keep_the_rows(svc_settings: Settings) -> None:
    """Table rebuilds on the way down (SQLite's batch mode) must not cascade through the foreign keys:
    a job keeps its events and its file, an adapter its job."""
    from app import queue
    from app.models import Adapter, FileRecord, JobEvent

    upgrade_to_head(svc_settings)
    engine = make_engine(svc_settings)
    with Session(engine) as session:
        record = FileRecord(
            filename="a.jsonl", purpose="fine-tune", bytes=1, rows=1, sha256="0" * 64, path="/x"
        )
        session.add(record)
        session.commit()
        new = queue.NewJob(
            base_model="b", dataset=record.id, file_id=record.id, config={"dataset": record.id}
        )
        job, _ = queue.create_job(session, new)
        session.add(Adapter(name="a", base_model="b", path="/a", job_id=job.id, manifest={}))
        session.commit()
        job_id, file_id = job.id, record.id
    engine.dispose()
    downgrade_to(svc_settings, "0003")
    upgrade_to_head(svc_settings)
    with Session(engine) as session:
        assert session.scalar(select(Job.file_id).where(Job.id == job_id)) == file_id
        assert session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)).all() == ["queued"]
        assert session.scalar(select(Adapter.job_id)) == job_id
    engine.dispose()


@ON_BOTH_DATABASES
def test_processes_starting_together_all_migrate_safely(svc_settings: Settings) -> None:
    """API and workers run `upgrade head` at start, and an operator may run `alembic upgrade head` at
    the same moment: all take the same migration lock, so all four succeed (none dies of a locked
    database or of a table another one just created)."""
    code = "from app.config import get_settings as s; from app.db import upgrade_to_head as up; up(s())"
    commands = [[sys.executable, "-c", code]] * 3 + [[sys.executable, "-m", "alembic", "upgrade", "head"]]
    procs = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=worker_env(svc_settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for command in commands
    ]
    outputs = [proc.communicate(timeout=120)[0].decode() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], outputs
    engine = make_engine(svc_settings)
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        assert len(conn.execute(select(ServiceIdentity.id)).all()) == 1  # migrated once, not twice


@ON_BOTH_DATABASES
def test_0002_turns_stored_dataset_paths_into_references(svc_settings: Settings) -> None:
    """Jobs queued before 0002 held an upload's server path in their config; after it, the reference
    (the file id) that app.datasets resolves when the child reads the data. And back down again."""
    engine = make_engine(svc_settings)
    upgrade_to_head(svc_settings)
    downgrade_to(svc_settings, "0001")
    path = str(svc_settings.uploads_dir / "abc.jsonl")
    # Plain SQL: the models hold columns of later migrations (0003) that a 0001 table lacks.
    old = {"dataset": path, "eval_dataset": path, "max_steps": 2}
    bare = {"dataset": "sample:capitals", "eval_dataset": None}
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO files (id, filename, purpose, bytes, rows, sha256, path, created_at) "
                "VALUES ('file_1', 't.jsonl', 'fine-tune', 1, 1, 'abc', :path, '2026-01-01')"
            ),
            {"path": path},
        )
        insert_job = text(
            "INSERT INTO jobs (id, status, priority, base_model, dataset, file_id, config, metadata, "
            "attempts, max_attempts, cancel_requested, step, created_at, updated_at) VALUES (:id, "
            "'queued', 0, 'tiny-gpt-oss', :dataset, :file_id, :config, '{}', 0, 3, false, 0, "
            "'2026-01-01', '2026-01-01')"
        )
        conn.execute(
            insert_job, {"id": "ftjob_1", "dataset": "file_1", "file_id": "file_1", "config": json.dumps(old)}
        )
        conn.execute(
            insert_job, {"id": "ftjob_2", "dataset": "capitals", "file_id": None, "config": json.dumps(bare)}
        )
    upgrade_to_head(svc_settings)
    with Session(engine) as session:
        upload, sample = session.get(Job, "ftjob_1"), session.get(Job, "ftjob_2")
        assert upload is not None and sample is not None
        assert upload.config == {"dataset": "file_1", "eval_dataset": "file_1", "max_steps": 2}
        assert (sample.dataset, sample.config["dataset"]) == ("sample:capitals", "sample:capitals")
        assert datasets.resolve_sources(session, upload.config) == {"dataset": path, "eval_dataset": path}
    downgrade_to(svc_settings, "0001")
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT config FROM jobs WHERE id = 'ftjob_1'")).scalar_one()
        restored = stored if isinstance(stored, dict) else json.loads(stored)  # PostgreSQL: JSON decoded
        assert restored["dataset"] == restored["eval_dataset"] == path
