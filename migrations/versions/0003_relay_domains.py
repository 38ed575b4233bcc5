"""relay domains (backup MX) and their recipients

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 11:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('relay_domains',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('to', sa.String(length=300), nullable=False),
    sa.Column('hold', sa.Boolean(), nullable=False),
    sa.Column('odmr_user', sa.String(length=320), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_relay_domains')),
    sa.UniqueConstraint('name', name=op.f('uq_relay_domains_name'))
    )
    op.create_table('relay_recipients',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('relay_domain_id', sa.Integer(), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['relay_domain_id'], ['relay_domains.id'],
                            name=op.f('fk_relay_recipients_relay_domain_id_relay_domains')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_relay_recipients')),
    sa.UniqueConstraint('address', name=op.f('uq_relay_recipients_address'))
    )
    with op.batch_alter_table('relay_recipients', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_relay_recipients_relay_domain_id'),
                              ['relay_domain_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('relay_recipients', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_relay_recipients_relay_domain_id'))
    op.drop_table('relay_recipients')
    op.drop_table('relay_domains')
