"""Initial schema: nodes, leases, submissions, groups, the consumption ledger, validation,
policy versions, trainer metrics, contributions.

Revision ID: 0001
Revises:
Create Date: 2026-11-29 16:55:51.713966
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    counters = op.create_table(
        "counters",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_counters")),
    )
    op.bulk_insert(counters, [{"name": "next_lease_number", "value": 0}])
    op.create_table(
        "nodes",
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("display_name", sa.String(length=128), nullable=False),
        sa.Column("engine", sa.String(length=64), nullable=False),
        sa.Column("hardware", sa.String(length=256), nullable=False),
        sa.Column("software_version", sa.String(length=64), nullable=False),
        sa.Column("registered_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_ms", sa.BigInteger(), nullable=False),
        sa.Column("policy_version", sa.BigInteger(), nullable=False),
        sa.Column("tokens_per_s", sa.Float(), nullable=False),
        sa.Column("banned", sa.Boolean(), nullable=False),
        sa.Column("ban_reason", sa.Text(), nullable=False),
        sa.Column("num_full_checks_passed", sa.Integer(), nullable=False),
        sa.Column("num_full_checks_failed", sa.Integer(), nullable=False),
        sa.Column("num_strikes", sa.Integer(), nullable=False),
        sa.Column("reputation", sa.Float(), nullable=False),
        sa.Column("num_rollouts_accepted", sa.BigInteger(), nullable=False),
        sa.Column("num_rollouts_rejected", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("node_id", name=op.f("pk_nodes")),
    )
    op.create_table(
        "policy_versions",
        sa.Column("version", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("base_version", sa.BigInteger(), nullable=False),
        sa.Column("codec", sa.Integer(), nullable=False),
        sa.Column("signed_manifest", sa.LargeBinary(), nullable=False),
        sa.Column("num_bytes", sa.BigInteger(), nullable=False),
        sa.Column("full_state_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_policy_versions")),
    )
    op.create_table(
        "requeued_prompts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("lease_number", sa.BigInteger(), nullable=False),
        sa.Column("prompt_indices", sa.JSON(), nullable=False),
        sa.Column("source_lease_id", sa.String(length=64), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_requeued_prompts")),
    )
    op.create_table(
        "trainer_metrics",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("metrics_json", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trainer_metrics")),
    )
    op.create_index(op.f("ix_trainer_metrics_step"), "trainer_metrics", ["step"], unique=False)
    op.create_table(
        "leases",
        sa.Column("lease_id", sa.String(length=64), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("lease_number", sa.BigInteger(), nullable=False),
        sa.Column("prompt_indices", sa.JSON(), nullable=False),
        sa.Column("group_size", sa.Integer(), nullable=False),
        sa.Column("temperature", sa.Float(), nullable=False),
        sa.Column("top_k", sa.Integer(), nullable=False),
        sa.Column("top_p", sa.Float(), nullable=False),
        sa.Column("max_tokens", sa.Integer(), nullable=False),
        sa.Column("sampling_seed", sa.BigInteger(), nullable=False),
        sa.Column("policy_version", sa.BigInteger(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("deadline_ms", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("closed_ms", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.node_id"], name=op.f("fk_leases_node_id_nodes")),
        sa.PrimaryKeyConstraint("lease_id", name=op.f("pk_leases")),
    )
    op.create_index(op.f("ix_leases_lease_number"), "leases", ["lease_number"], unique=False)
    op.create_index(op.f("ix_leases_node_id_state"), "leases", ["node_id", "state"], unique=False)
    op.create_index(op.f("ix_leases_state_deadline_ms"), "leases", ["state", "deadline_ms"], unique=False)
    op.create_table(
        "submissions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("batch_hash", sa.LargeBinary(), nullable=False),
        sa.Column("lease_id", sa.String(length=64), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("receipt", sa.LargeBinary(), nullable=False),
        sa.Column("num_accepted", sa.Integer(), nullable=False),
        sa.Column("num_rejected", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.node_id"], name=op.f("fk_submissions_node_id_nodes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_submissions")),
        sa.UniqueConstraint("batch_hash", name=op.f("uq_submissions_batch_hash")),
    )
    op.create_index(op.f("ix_submissions_node_id_id"), "submissions", ["node_id", "id"], unique=False)
    op.create_table(
        "groups",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("group_id", sa.String(length=160), nullable=False),
        sa.Column("submission_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("lease_id", sa.String(length=64), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("prompt_index", sa.BigInteger(), nullable=False),
        sa.Column("policy_version", sa.BigInteger(), nullable=False),
        sa.Column("group_bytes", sa.LargeBinary(), nullable=False),
        sa.Column("num_tokens", sa.Integer(), nullable=False),
        sa.Column("num_rollouts", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=24), nullable=False),
        sa.Column("verified", sa.Boolean(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["submission_id"], ["submissions.id"], name=op.f("fk_groups_submission_id_submissions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_groups")),
        sa.UniqueConstraint("group_id", name=op.f("uq_groups_group_id")),
    )
    op.create_index(op.f("ix_groups_node_id_state"), "groups", ["node_id", "state"], unique=False)
    op.create_index(
        op.f("ix_groups_state_policy_version_id"), "groups", ["state", "policy_version", "id"], unique=False
    )
    op.create_index(op.f("ix_groups_submission_id"), "groups", ["submission_id"], unique=False)
    op.create_table(
        "rollout_hashes",
        sa.Column("content_hash", sa.LargeBinary(), nullable=False),
        sa.Column("submission_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["submission_id"], ["submissions.id"], name=op.f("fk_rollout_hashes_submission_id_submissions")
        ),
        sa.PrimaryKeyConstraint("content_hash", name=op.f("pk_rollout_hashes")),
    )
    op.create_index(op.f("ix_rollout_hashes_submission_id"), "rollout_hashes", ["submission_id"], unique=False)
    op.create_table(
        "verdicts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("submission_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("prompt_index", sa.BigInteger(), nullable=False),
        sa.Column("sample_index", sa.Integer(), nullable=False),
        sa.Column("accepted", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(length=48), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("evidence_json", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["submission_id"], ["submissions.id"], name=op.f("fk_verdicts_submission_id_submissions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verdicts")),
    )
    op.create_index(op.f("ix_verdicts_node_id_accepted_id"), "verdicts", ["node_id", "accepted", "id"], unique=False)
    op.create_index(op.f("ix_verdicts_submission_id"), "verdicts", ["submission_id"], unique=False)
    op.create_table(
        "contributions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("group_id", sa.String(length=160), nullable=False),
        sa.Column("num_tokens", sa.Integer(), nullable=False),
        sa.Column("num_rollouts", sa.Integer(), nullable=False),
        sa.Column("flops_estimate", sa.Float(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("settled", sa.Boolean(), nullable=False),
        sa.Column("voided", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["group_id"], ["groups.group_id"], name=op.f("fk_contributions_group_id_groups")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contributions")),
        sa.UniqueConstraint("group_id", name=op.f("uq_contributions_group_id")),
    )
    op.create_index(
        op.f("ix_contributions_node_id_settled_voided"), "contributions", ["node_id", "settled", "voided"], unique=False
    )
    op.create_index(
        op.f("ix_contributions_settled_voided_created_ms"),
        "contributions",
        ["settled", "voided", "created_ms"],
        unique=False,
    )
    op.create_table(
        "group_consumptions",
        sa.Column("group_id", sa.String(length=160), nullable=False),
        sa.Column("trainer_step", sa.BigInteger(), nullable=False),
        sa.Column("consumed_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["group_id"], ["groups.group_id"], name=op.f("fk_group_consumptions_group_id_groups")),
        sa.PrimaryKeyConstraint("group_id", name=op.f("pk_group_consumptions")),
    )
    op.create_index(op.f("ix_group_consumptions_trainer_step"), "group_consumptions", ["trainer_step"], unique=False)
    op.create_table(
        "validation_results",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("group_id", sa.String(length=160), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("check_name", sa.String(length=64), nullable=False),
        sa.Column("evidence_json", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["group_id"], ["groups.group_id"], name=op.f("fk_validation_results_group_id_groups")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_validation_results")),
    )
    op.create_index(op.f("ix_validation_results_group_id"), "validation_results", ["group_id"], unique=False)
    op.create_index(
        op.f("ix_validation_results_node_id_passed_id"), "validation_results", ["node_id", "passed", "id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_validation_results_node_id_passed_id"), table_name="validation_results")
    op.drop_index(op.f("ix_validation_results_group_id"), table_name="validation_results")
    op.drop_table("validation_results")
    op.drop_index(op.f("ix_group_consumptions_trainer_step"), table_name="group_consumptions")
    op.drop_table("group_consumptions")
    op.drop_index(op.f("ix_contributions_settled_voided_created_ms"), table_name="contributions")
    op.drop_index(op.f("ix_contributions_node_id_settled_voided"), table_name="contributions")
    op.drop_table("contributions")
    op.drop_index(op.f("ix_verdicts_submission_id"), table_name="verdicts")
    op.drop_index(op.f("ix_verdicts_node_id_accepted_id"), table_name="verdicts")
    op.drop_table("verdicts")
    op.drop_index(op.f("ix_rollout_hashes_submission_id"), table_name="rollout_hashes")
    op.drop_table("rollout_hashes")
    op.drop_index(op.f("ix_groups_submission_id"), table_name="groups")
    op.drop_index(op.f("ix_groups_state_policy_version_id"), table_name="groups")
    op.drop_index(op.f("ix_groups_node_id_state"), table_name="groups")
    op.drop_table("groups")
    op.drop_index(op.f("ix_submissions_node_id_id"), table_name="submissions")
    op.drop_table("submissions")
    op.drop_index(op.f("ix_leases_state_deadline_ms"), table_name="leases")
    op.drop_index(op.f("ix_leases_node_id_state"), table_name="leases")
    op.drop_index(op.f("ix_leases_lease_number"), table_name="leases")
    op.drop_table("leases")
    op.drop_index(op.f("ix_trainer_metrics_step"), table_name="trainer_metrics")
    op.drop_table("trainer_metrics")
    op.drop_table("requeued_prompts")
    op.drop_table("policy_versions")
    op.drop_table("nodes")
    op.drop_table("counters")
