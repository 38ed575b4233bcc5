"""Outbound TLS: the administrator's TLS policies, the MTA-STS policy cache, TLS-RPT counts

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 17:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'tls_policies',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('domain', sa.String(length=255), nullable=False),
        sa.Column('policy', sa.String(length=16), nullable=False),
        sa.Column('created', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_tls_policies')),
        sa.UniqueConstraint('domain', name=op.f('uq_tls_policies_domain')),
    )
    op.create_table(
        'mta_sts_policies',
        sa.Column('domain', sa.String(length=255), nullable=False),
        sa.Column('policy_id', sa.String(length=32), nullable=False),
        sa.Column('mode', sa.String(length=16), nullable=False),
        sa.Column('mx', sa.String(length=4000), nullable=False),
        sa.Column('max_age', sa.Integer(), nullable=False),
        sa.Column('fetched', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('domain', name=op.f('pk_mta_sts_policies')),
    )
    op.create_table(
        'tls_report_counts',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('day', sa.String(length=10), nullable=False),
        sa.Column('domain', sa.String(length=255), nullable=False),
        sa.Column('policy_type', sa.String(length=16), nullable=False),
        sa.Column('policy_string', sa.String(length=4000), nullable=False),
        sa.Column('result', sa.String(length=64), nullable=False),
        sa.Column('mx', sa.String(length=255), nullable=False),
        sa.Column('count', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_tls_report_counts')),
        sa.UniqueConstraint('day', 'domain', 'policy_type', 'result', 'mx',
                            name='uq_tls_report_counts_key'),
    )
    op.create_index(op.f('ix_tls_report_counts_day'), 'tls_report_counts', ['day'])


def downgrade() -> None:
    op.drop_index(op.f('ix_tls_report_counts_day'), table_name='tls_report_counts')
    op.drop_table('tls_report_counts')
    op.drop_table('mta_sts_policies')
    op.drop_table('tls_policies')
