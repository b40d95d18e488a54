"""node_chunks: the commitment statistics of each node's newest fully checked chunks.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 15:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "node_chunks",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("group_id", sa.String(length=160), nullable=False),
        sa.Column("exponent_mismatches", sa.Integer(), nullable=False),
        sa.Column("mantissa_error_sum", sa.Float(), nullable=False),
        sa.Column("num_matched", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["group_id"], ["groups.group_id"], name=op.f("fk_node_chunks_group_id_groups")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_chunks")),
    )
    op.create_index(op.f("ix_node_chunks_group_id"), "node_chunks", ["group_id"], unique=False)
    op.create_index(op.f("ix_node_chunks_node_id_id"), "node_chunks", ["node_id", "id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_node_chunks_node_id_id"), table_name="node_chunks")
    op.drop_index(op.f("ix_node_chunks_group_id"), table_name="node_chunks")
    op.drop_table("node_chunks")
