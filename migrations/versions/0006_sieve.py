"""Sieve: users' scripts and the vacation replies sent

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 20:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'sieve_scripts',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('address', sa.String(length=320), nullable=False),
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('content', sa.Text(), nullable=False),
        sa.Column('active', sa.Boolean(), nullable=False),
        sa.Column('updated', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_sieve_scripts')),
        sa.UniqueConstraint('address', 'name', name='uq_sieve_scripts_address_name'),
    )
    op.create_index(op.f('ix_sieve_scripts_address'), 'sieve_scripts', ['address'])
    op.create_table(
        'vacation_replies',
        sa.Column('key', sa.String(length=64), nullable=False),
        sa.Column('address', sa.String(length=320), nullable=False),
        sa.Column('sent', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('key', name=op.f('pk_vacation_replies')),
    )
    op.create_index(op.f('ix_vacation_replies_address'), 'vacation_replies', ['address'])
    op.create_index(op.f('ix_vacation_replies_sent'), 'vacation_replies', ['sent'])


def downgrade() -> None:
    op.drop_index(op.f('ix_vacation_replies_sent'), table_name='vacation_replies')
    op.drop_index(op.f('ix_vacation_replies_address'), table_name='vacation_replies')
    op.drop_table('vacation_replies')
    op.drop_index(op.f('ix_sieve_scripts_address'), table_name='sieve_scripts')
    op.drop_table('sieve_scripts')
