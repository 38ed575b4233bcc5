"""users.scram_sha256: the SCRAM-SHA-256 keys beside the argon2 hash

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 14:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('users') as batch:
        batch.add_column(sa.Column('scram_sha256', sa.String(length=512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('users') as batch:
        batch.drop_column('scram_sha256')
