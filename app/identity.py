"""The database's id and the data folder's marker: no process runs against a data folder that is not
the one this database's uploads, checkpoints and adapters were written to.

The id is the one row of `service_identity` (made by a migration). The first API or worker to start
writes it to `<data_dir>/.database-id` and records in the row which host and folder did; every later
start compares the marker with the row. Two hosts sharing a PostgreSQL server but not the data folder
(a network mount missing on one of them) then refuse to start, naming both, instead of training
adapters the API cannot read.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from sqlalchemy import Engine, select, update

from app.config import Settings
from app.db import immediate_session, utcnow
from app.models import ServiceIdentity

MARKER = ".database-id"


class DataDirMismatch(RuntimeError):
    """The data folder is not the one the database expects; the message says what to fix."""


def check_data_dir(settings: Settings, engine: Engine) -> str:
    """Compare `<data_dir>/.database-id` with the database's id, writing it on the very first start.

    Returns the id; raises DataDirMismatch. Runs after the migrations (the row comes from them)."""
    folder = settings.data_dir.resolve()
    marker = folder / MARKER
    with immediate_session(engine) as session:
        # Row-locked: a second process starting at once waits, then finds the claim made.
        row = session.scalars(select(ServiceIdentity).with_for_update()).one()
        found = _read_marker(marker)
        if found == row.id:
            return row.id
        if found is not None:
            raise DataDirMismatch(
                f"the data folder {folder} belongs to database {found}, but GPTOSS_DATABASE_URL points at "
                f"database {row.id} (first used with {row.data_dir_claimed_by}); point GPTOSS_DATA_DIR "
                "and GPTOSS_DATABASE_URL at the same deployment"
            )
        if row.data_dir_claimed_at is not None:
            raise DataDirMismatch(
                f"the data folder {folder} has no {MARKER}, but database {row.id} keeps its files in "
                f"{row.data_dir_claimed_by}; mount that folder here (on several hosts: the same network "
                "filesystem at GPTOSS_DATA_DIR on every host, see README 'Several GPUs and hosts')"
            )
        _write_marker(marker, row.id)
        session.execute(
            update(ServiceIdentity)
            .where(ServiceIdentity.id == row.id)
            .values(data_dir_claimed_at=utcnow(), data_dir_claimed_by=f"{socket.gethostname()}:{folder}")
        )
        return row.id


def _read_marker(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _write_marker(path: Path, database_id: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(database_id + "\n")
    tmp.replace(path)  # atomic: a process starting meanwhile reads all of the id or none of it
