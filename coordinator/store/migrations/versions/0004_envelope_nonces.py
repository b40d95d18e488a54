"""Replicas: envelope nonces shared by every coordinator process on one store.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "envelope_nonces",
        sa.Column("signer_public_key", sa.LargeBinary(length=32), nullable=False),
        sa.Column("nonce", sa.LargeBinary(length=32), nullable=False),
        sa.Column("expires_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("signer_public_key", "nonce", name=op.f("pk_envelope_nonces")),
    )
    op.create_index(op.f("ix_envelope_nonces_expires_ms"), "envelope_nonces", ["expires_ms"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_envelope_nonces_expires_ms"), table_name="envelope_nonces")
    op.drop_table("envelope_nonces")
