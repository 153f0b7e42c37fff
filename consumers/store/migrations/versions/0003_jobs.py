"""heavy jobs

Revision ID: 0003_jobs
Revises: 0002
Create Date: 2026-12-04 02:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003_jobs'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('jobs',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('task_id', sa.String(length=36), nullable=False),
    sa.Column('current_task_id', sa.String(length=36), nullable=False),
    sa.Column('handed_over_by', sa.String(length=36), nullable=True),
    sa.Column('running', sa.Boolean(), nullable=False),
    sa.Column('source_url', sa.String(length=2048), nullable=True),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('downloaded', sa.Boolean(), nullable=False),
    sa.Column('bytes_total', sa.BigInteger(), nullable=True),
    sa.Column('bytes_done', sa.BigInteger(), nullable=False),
    sa.Column('lines_done', sa.BigInteger(), nullable=False),
    sa.Column('error_bytes', sa.BigInteger(), nullable=False),
    sa.Column('published', sa.BigInteger(), nullable=False),
    sa.Column('errors_count', sa.BigInteger(), nullable=False),
    sa.Column('rows', sa.BigInteger(), nullable=False),
    sa.Column('continuations', sa.Integer(), nullable=False),
    sa.Column('lost_runs', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('owner_key_id', sa.String(length=36), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_jobs_created_at', 'jobs', ['created_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_jobs_created_at', table_name='jobs')
    op.drop_table('jobs')
