"""scheduled work: beat's shared last runs, an index for the stuck-delivery sweep

Revision ID: 0004_beat
Revises: 0003_jobs
Create Date: 2026-12-04 02:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004_beat'
down_revision = '0003_jobs'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('beat_runs',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('last_run_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index('ix_deliveries_status_updated', ['status', 'updated_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_deliveries_status_updated')

    op.drop_table('beat_runs')
