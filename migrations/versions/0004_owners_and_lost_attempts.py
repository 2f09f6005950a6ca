"""objects belong to the API key that made them; lost attempts counted apart

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 01:10:00

files.api_key_id and adapters.api_key_id (jobs already had theirs): other keys get 404 for them.
Rows from before keep NULL, which only admin keys (and auth=none) see. An adapter's owner is taken
from its job where it has one. jobs.lost_attempts counts attempts lost to crashes that were not the
job's doing (a worker gone, a training child killed), apart from max_attempts.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("api_key_id", sa.String(40), nullable=True))
        batch.create_index("ix_files_api_key_id", ["api_key_id"])
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("api_key_id", sa.String(40), nullable=True))
        batch.create_index("ix_adapters_api_key_id", ["api_key_id"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lost_attempts", sa.Integer(), nullable=False, server_default="0"))
    op.execute(
        "UPDATE adapters SET api_key_id = (SELECT jobs.api_key_id FROM jobs WHERE jobs.id = adapters.job_id)"
        " WHERE job_id IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lost_attempts")
    with op.batch_alter_table("adapters") as batch:
        batch.drop_index("ix_adapters_api_key_id")
        batch.drop_column("api_key_id")
    with op.batch_alter_table("files") as batch:
        batch.drop_index("ix_files_api_key_id")
        batch.drop_column("api_key_id")
