"""service identity: the database's id, checked against the data folder's marker at every start

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 10:12:00.000000
"""

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table('service_identity',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('data_dir_claimed_at', sa.DateTime(), nullable=True),
    sa.Column('data_dir_claimed_by', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    # The one row: made here, so every database (new or upgraded) has exactly one id from its first
    # migration on, whichever process ran it.
    op.bulk_insert(table, [{'id': str(uuid.uuid4()), 'created_at': datetime.now(UTC).replace(tzinfo=None)}])


def downgrade() -> None:
    op.drop_table('service_identity')
