"""Lifetime token statistics per node, for the lifetime tests of coordinator/node_stats.py.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 17:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COUNTS = (
    "num_groups",
    "num_tokens",
    "num_near_ties",
    "num_directed_near_ties",
    "num_near_ties_up",
    "num_near_ties_positive",
)
SUMS = (
    "near_ties_positive_expected",
    "near_ties_positive_variance",
    "logprob_advantage_sum",
    "logprob_advantage_sum_squares",
)


def upgrade() -> None:
    op.create_table(
        "node_token_totals",
        sa.Column("node_id", sa.String(length=128), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in COUNTS),
        *(sa.Column(name, sa.Float(), nullable=False) for name in SUMS),
        sa.PrimaryKeyConstraint("node_id", name=op.f("pk_node_token_totals")),
    )


def downgrade() -> None:
    op.drop_table("node_token_totals")
