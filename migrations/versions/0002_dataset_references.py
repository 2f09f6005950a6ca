"""jobs store dataset references, not resolved paths

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 00:40:00

Before 0002 a job's config held the server path of an uploaded dataset (config.dataset, and
config.eval_dataset when that was an upload), and jobs.dataset held the name as the client gave it
(a bare sample name included). From 0002 on, all three hold a reference (the upload's id,
sample:<name> or hf:<id>) that app.datasets resolves when the data is read. Data only; no column
changes. An eval path whose upload record was deleted stays as it was: only finished jobs can have
one (a file is not deletable while an active job uses it), and finished jobs never read it again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

jobs = sa.table(
    "jobs", sa.column("id", sa.String), sa.column("dataset", sa.Text), sa.column("config", sa.JSON)
)
files = sa.table("files", sa.column("id", sa.String), sa.column("path", sa.Text))


def _paths() -> dict[str, str]:
    """Upload id -> stored path."""
    return dict(op.get_bind().execute(sa.select(files.c.id, files.c.path)).all())


def _set(job_id: str, **values: object) -> None:
    op.get_bind().execute(sa.update(jobs).where(jobs.c.id == job_id).values(**values))


def _reference(given: str) -> str:
    """A bare sample name became sample:<name> when the job was created; references stay."""
    if given.startswith(("file_", "sample:", "hf:")):
        return given
    return f"sample:{given}"


def upgrade() -> None:
    by_path: dict[str, str] = {}
    for file_id, path in sorted(_paths().items(), reverse=True):
        by_path[path] = file_id  # same bytes, several records: the oldest one
    rows = op.get_bind().execute(sa.select(jobs.c.id, jobs.c.dataset, jobs.c.config)).all()
    for job_id, given, config in rows:
        ref = _reference(given)
        config = {**config, "dataset": ref}
        if config.get("eval_dataset") in by_path:
            config["eval_dataset"] = by_path[config["eval_dataset"]]
        _set(job_id, dataset=ref, config=config)


def downgrade() -> None:
    paths = _paths()
    for job_id, config in op.get_bind().execute(sa.select(jobs.c.id, jobs.c.config)).all():
        config = dict(config)
        for key in ("dataset", "eval_dataset"):
            if config.get(key) in paths:
                config[key] = paths[config[key]]
        _set(job_id, config=config)
