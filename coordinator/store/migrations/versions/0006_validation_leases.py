"""Validation leases in the store: every replica's validators share them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 18:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("groups") as groups:
        groups.add_column(sa.Column("validation_lent_to", sa.String(length=128), server_default="", nullable=False))
        groups.add_column(sa.Column("validation_lent_until_ms", sa.BigInteger(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("groups") as groups:
        groups.drop_column("validation_lent_until_ms")
        groups.drop_column("validation_lent_to")
