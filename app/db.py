"""Engine, sessions and schema upgrades, shared by the API, the worker and its child processes.

SQLite (the embedded default) gets WAL (readers never block the one writer), a busy timeout (writers
wait instead of failing) and foreign keys. The driver's own transaction handling is switched off so
that SQLAlchemy's BEGIN is the real one; `immediate_session` starts with BEGIN IMMEDIATE, taking the
write lock up front, which is what the job claim needs. PostgreSQL (`postgresql+psycopg://...`) gets a
connection pool sized from settings; it needs none of the above (row locks, MVCC). Everything
SQLite-only in this module stays behind an `is_sqlite` check, so the same code runs on both.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
POOL_TIMEOUT_S = 10.0
# The key of the PostgreSQL advisory lock every migrating process takes (any fixed bigint: "gpts").
MIGRATION_LOCK_KEY = 0x67707473
ROOT = Path(__file__).resolve().parent.parent


def utcnow() -> datetime:
    """Naive UTC: SQLite has no time zones, and every timestamp in the database is UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


def _install_sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below be the only one
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "")
        conn.exec_driver_sql(f"BEGIN {mode}".strip())


def is_sqlite(bind: Engine | Connection) -> bool:
    return bind.dialect.name == "sqlite"


def make_engine(settings: Settings) -> Engine:
    url = settings.db_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # One connection per API thread (each runs one route at a time) plus as many for the
        # probes and metrics that run beside them; a wait past POOL_TIMEOUT_S is a 503, not a hang.
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=settings.api_threads,
            max_overflow=settings.api_threads,
            pool_timeout=POOL_TIMEOUT_S,
        )
        _install_sqlite_pragmas(engine)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,  # a server restart or an idle timeout must not fail the next request
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
    )


def make_sessionmaker(engine: Engine, *, immediate: bool = False) -> sessionmaker[Session]:
    """`immediate=True` for sessions that read and then write: in WAL mode a deferred transaction whose
    snapshot went stale cannot upgrade to a write (SQLITE_BUSY at once, busy_timeout or not), while
    BEGIN IMMEDIATE waits its turn for the write lock up front. Elsewhere a plain BEGIN (row locks)."""
    bind = engine.execution_options(sqlite_begin="IMMEDIATE") if immediate and is_sqlite(engine) else engine
    return sessionmaker(bind, expire_on_commit=False)


@contextmanager
def immediate_session(engine: Engine) -> Iterator[Session]:
    """A session whose transaction is BEGIN IMMEDIATE on SQLite (plain BEGIN elsewhere); commits on exit."""
    conn = engine.connect()
    if is_sqlite(conn):
        conn.execution_options(sqlite_begin="IMMEDIATE")
    with conn, Session(bind=conn) as session, session.begin():
        yield session


@contextmanager
def migration_lock(conn: Connection) -> Iterator[None]:
    """Serialise schema upgrades across every process that runs them: the API, each worker and
    `alembic upgrade head` from the command line (migrations/env.py takes it, so all of them do).

    PostgreSQL: a session advisory lock on the migrating connection, which holds across hosts and
    is released by the server if the process dies. SQLite: an flock on a file beside the database
    (SQLite serves one host, where a file lock is enough); its migration then starts with BEGIN
    IMMEDIATE, so a writer that started meanwhile makes it wait rather than fail."""
    if not is_sqlite(conn):
        conn.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")
        conn.commit()  # the lock is the session's: it outlives this transaction
        try:
            yield
        finally:
            conn.rollback()
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")
            conn.commit()
        return
    database = make_url(str(conn.engine.url)).database
    if not database or database == ":memory:":
        yield
        return
    conn.execution_options(sqlite_begin="IMMEDIATE")
    with open(f"{database}.migrate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _alembic_config(settings: Settings) -> Any:
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["settings"] = settings
    return cfg


def upgrade_to_head(settings: Settings) -> None:
    """`alembic upgrade head`; migrations/env.py takes `migration_lock`, so an API, workers and the
    command line starting together are safe."""
    from alembic import command

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(_alembic_config(settings), "head")


def downgrade_to(settings: Settings, revision: str) -> None:
    from alembic import command

    command.downgrade(_alembic_config(settings), revision)


@lru_cache(maxsize=1)
def head_revision() -> str | None:
    """The newest migration in this checkout (fixed for the life of the process)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    return ScriptDirectory.from_config(cfg).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
