"""Alembic environment: the URL comes from Settings (passed in by app.db.upgrade_to_head, else read
from the environment), so migrations run against exactly the database the service uses. Every online
run holds app.db.migration_lock, so `alembic upgrade head` from the command line, the API and the
workers never migrate at the same time (on SQLite or on PostgreSQL, on one host or several)."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from app.config import Settings, get_settings
from app.db import make_engine, migration_lock
from app.models import Base

config = context.config
# Only the command line configures logging here; inside the service the app's logging stays as set up.
if config.config_file_name is not None and "settings" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

settings: Settings = config.attributes.get("settings") or get_settings()


def run_migrations_offline() -> None:
    context.configure(url=settings.db_url, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(settings)
    try:
        with engine.connect() as connection, migration_lock(connection):
            if connection.dialect.name == "sqlite":
                # Batch mode rebuilds a table (copy, DROP, rename): with foreign keys on, that DROP would
                # cascade (job_events deleted, references set to NULL). SQLite ignores this pragma inside
                # a transaction, so it goes to the driver before the migration's BEGIN; the connection
                # is closed with the engine afterwards, so no other work sees it off.
                connection.connection.driver_connection.execute("PRAGMA foreign_keys = OFF")
            # render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds the table instead.
            context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
