"""Round two of trust and hardening: lease seeds and walk-aways, probation and strikes, node token
windows, idempotent trainer metrics.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 01:00:00
"""

from __future__ import annotations

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # leases: seeds fixed per prompt set; releases and expiries per node
    op.create_table(
        "coordinator_secrets",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_coordinator_secrets")),
    )
    op.create_index(op.f("ix_leases_node_id_closed_ms"), "leases", ["node_id", "closed_ms"], unique=False)
    with op.batch_alter_table("nodes") as nodes:
        for column in ("num_leases_released", "num_leases_expired", "num_lease_cooldowns"):
            nodes.add_column(sa.Column(column, sa.Integer(), server_default="0", nullable=False))
        nodes.add_column(sa.Column("lease_cooldown_until_ms", sa.BigInteger(), server_default="0", nullable=False))
    # validation: probation, strikes, node token windows
    op.create_table(
        "node_tokens",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("group_id", sa.String(length=160), nullable=False),
        sa.Column("num_tokens", sa.Integer(), nullable=False),
        sa.Column("num_near_ties", sa.Integer(), nullable=False),
        sa.Column("num_directed_near_ties", sa.Integer(), nullable=False),
        sa.Column("num_near_ties_up", sa.Integer(), nullable=False),
        sa.Column("num_near_ties_positive", sa.Integer(), nullable=False),
        sa.Column("near_ties_positive_expected", sa.Float(), nullable=False),
        sa.Column("near_ties_positive_variance", sa.Float(), nullable=False),
        sa.Column("logprob_advantage_sum", sa.Float(), nullable=False),
        sa.Column("logprob_advantage_sum_squares", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["group_id"], ["groups.group_id"], name=op.f("fk_node_tokens_group_id_groups")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_tokens")),
        sa.UniqueConstraint("group_id", name=op.f("uq_node_tokens_group_id")),
    )
    op.create_index(op.f("ix_node_tokens_node_id_id"), "node_tokens", ["node_id", "id"], unique=False)
    with op.batch_alter_table("nodes") as nodes:
        nodes.add_column(sa.Column("on_probation", sa.Boolean(), server_default=sa.false(), nullable=False))
        for column in ("num_checked_tokens", "probation_start_tokens"):
            nodes.add_column(sa.Column(column, sa.BigInteger(), server_default="0", nullable=False))
    with op.batch_alter_table("validation_results") as results:
        results.add_column(sa.Column("num_groups_consumed", sa.Integer(), nullable=True))
    # trainer metrics: keyed by step (of steps reported more than once, the last report stays)
    op.execute("DELETE FROM trainer_metrics WHERE id NOT IN (SELECT MAX(id) FROM trainer_metrics GROUP BY step)")
    op.drop_index(op.f("ix_trainer_metrics_step"), table_name="trainer_metrics")
    op.create_index(op.f("ix_trainer_metrics_step"), "trainer_metrics", ["step"], unique=True)


def downgrade() -> None:
    # trainer metrics
    op.drop_index(op.f("ix_trainer_metrics_step"), table_name="trainer_metrics")
    op.create_index(op.f("ix_trainer_metrics_step"), "trainer_metrics", ["step"], unique=False)
    # validation
    with op.batch_alter_table("validation_results") as results:
        results.drop_column("num_groups_consumed")
    with op.batch_alter_table("nodes") as nodes:
        for column in ("probation_start_tokens", "num_checked_tokens", "on_probation"):
            nodes.drop_column(column)
    op.drop_index(op.f("ix_node_tokens_node_id_id"), table_name="node_tokens")
    op.drop_table("node_tokens")
    # leases
    with op.batch_alter_table("nodes") as nodes:
        for column in ("lease_cooldown_until_ms", "num_lease_cooldowns", "num_leases_expired", "num_leases_released"):
            nodes.drop_column(column)
    op.drop_index(op.f("ix_leases_node_id_closed_ms"), table_name="leases")
    op.drop_table("coordinator_secrets")
