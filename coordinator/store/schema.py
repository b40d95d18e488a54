"""The tables of the coordinator's store. Migrations in migrations/versions/ create exactly these
(a contract test compares them); change both together, in a new revision."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite autoincrements only an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
AUTO_ID = BigInteger().with_variant(Integer(), "sqlite")

NODE_ID = String(128)
LEASE_ID = String(64)
GROUP_ID = String(160)

LEASE_COUNTER = "next_lease_number"

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Node(Base):
    __tablename__ = "nodes"

    node_id: Mapped[str] = mapped_column(NODE_ID, primary_key=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    display_name: Mapped[str] = mapped_column(String(128))
    engine: Mapped[str] = mapped_column(String(64))
    hardware: Mapped[str] = mapped_column(String(256))
    software_version: Mapped[str] = mapped_column(String(64))
    registered_ms: Mapped[int] = mapped_column(BigInteger)
    last_seen_ms: Mapped[int] = mapped_column(BigInteger)
    policy_version: Mapped[int] = mapped_column(BigInteger)
    tokens_per_s: Mapped[float] = mapped_column(Float)
    banned: Mapped[bool] = mapped_column(Boolean)
    ban_reason: Mapped[str] = mapped_column(Text)
    num_full_checks_passed: Mapped[int] = mapped_column(Integer)
    num_full_checks_failed: Mapped[int] = mapped_column(Integer)
    num_strikes: Mapped[int] = mapped_column(Integer)
    reputation: Mapped[float] = mapped_column(Float)
    num_rollouts_accepted: Mapped[int] = mapped_column(BigInteger)
    num_rollouts_rejected: Mapped[int] = mapped_column(BigInteger)
    num_leases_released: Mapped[int] = mapped_column(Integer, server_default="0")
    num_leases_expired: Mapped[int] = mapped_column(Integer, server_default="0")
    num_lease_cooldowns: Mapped[int] = mapped_column(Integer, server_default="0")
    lease_cooldown_until_ms: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # A node registered before probation existed has earned trust already (server default false);
    # a new one starts on probation (the store inserts true).
    on_probation: Mapped[bool] = mapped_column(Boolean, server_default=false())
    num_checked_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    probation_start_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")


class Counter(Base):
    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class CoordinatorSecret(Base):
    """Random keys the coordinator keeps to itself, made on first use (e.g. the key sampling seeds
    are derived with): shared by its replicas, kept across restarts, never sent to a node."""

    __tablename__ = "coordinator_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)


class Lease(Base):
    __tablename__ = "leases"
    __table_args__ = (
        Index(None, "node_id", "state"),
        Index(None, "state", "deadline_ms"),
        Index(None, "node_id", "closed_ms"),
    )

    lease_id: Mapped[str] = mapped_column(LEASE_ID, primary_key=True)
    node_id: Mapped[str] = mapped_column(NODE_ID, ForeignKey("nodes.node_id"))
    lease_number: Mapped[int] = mapped_column(BigInteger, index=True)
    prompt_indices: Mapped[list[int]] = mapped_column(JSON)
    group_size: Mapped[int] = mapped_column(Integer)
    temperature: Mapped[float] = mapped_column(Float)
    top_k: Mapped[int] = mapped_column(Integer)
    top_p: Mapped[float] = mapped_column(Float)
    max_tokens: Mapped[int] = mapped_column(Integer)
    sampling_seed: Mapped[int] = mapped_column(BigInteger)
    policy_version: Mapped[int] = mapped_column(BigInteger)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    deadline_ms: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    closed_ms: Mapped[int | None] = mapped_column(BigInteger)


class RequeuedPromptSet(Base):
    __tablename__ = "requeued_prompts"

    id: Mapped[int] = mapped_column(AUTO_ID, primary_key=True, autoincrement=True)
    lease_number: Mapped[int] = mapped_column(BigInteger)
    prompt_indices: Mapped[list[int]] = mapped_column(JSON)
    source_lease_id: Mapped[str] = mapped_column(LEASE_ID)
    created_ms: Mapped[int] = mapped_column(BigInteger)


class Submission(Base):
    __tablename__ = "submissions"
    __table_args__ = (Index(None, "node_id", "id"),)

    id: Mapped[int] = mapped_column(AUTO_ID, primary_key=True, autoincrement=True)
    batch_hash: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    lease_id: Mapped[str] = mapped_column(LEASE_ID)
    node_id: Mapped[str] = mapped_column(NODE_ID, ForeignKey("nodes.node_id"))
    created_ms: Mapped[int] = mapped_column(BigInteger)
    receipt: Mapped[bytes] = mapped_column(LargeBinary)
    num_accepted: Mapped[int] = mapped_column(Integer)
    num_rejected: Mapped[int] = mapped_column(Integer)


class Group(Base):
    __tablename__ = "groups"
    __table_args__ = (
        Index(None, "state", "policy_version", "id"),
        Index(None, "node_id", "state"),
    )

    id: Mapped[int] = mapped_column(AUTO_ID, primary_key=True, autoincrement=True)
    group_id: Mapped[str] = mapped_column(GROUP_ID, unique=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"), index=True)
    lease_id: Mapped[str] = mapped_column(LEASE_ID)
    node_id: Mapped[str] = mapped_column(NODE_ID)
    prompt_index: Mapped[int] = mapped_column(BigInteger)
    policy_version: Mapped[int] = mapped_column(BigInteger)
    group_bytes: Mapped[bytes] = mapped_column(LargeBinary)
    num_tokens: Mapped[int] = mapped_column(Integer)
    num_rollouts: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(24))
    verified: Mapped[bool] = mapped_column(Boolean)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)
    # A group pending validation is lent to one validator until then, whichever replica lent it.
    validation_lent_to: Mapped[str] = mapped_column(String(128), server_default="")
    validation_lent_until_ms: Mapped[int] = mapped_column(BigInteger, server_default="0")


class GroupConsumption(Base):
    """The trainer's ledger: the primary key makes a second consumption of a group impossible."""

    __tablename__ = "group_consumptions"

    group_id: Mapped[str] = mapped_column(GROUP_ID, ForeignKey("groups.group_id"), primary_key=True)
    trainer_step: Mapped[int] = mapped_column(BigInteger, index=True)
    consumed_ms: Mapped[int] = mapped_column(BigInteger)


class Verdict(Base):
    __tablename__ = "verdicts"
    __table_args__ = (Index(None, "node_id", "accepted", "id"),)

    id: Mapped[int] = mapped_column(AUTO_ID, primary_key=True, autoincrement=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"), index=True)
    node_id: Mapped[str] = mapped_column(NODE_ID)
    prompt_index: Mapped[int] = mapped_column(BigInteger)
    sample_index: Mapped[int] = mapped_column(Integer)
    accepted: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(String(48))
    message: Mapped[str] = mapped_column(Text)
    evidence_json: Mapped[str] = mapped_column(Text)
    created_ms: Mapped[int] = mapped_column(BigInteger)


class RolloutHash(Base):
    __tablename__ = "rollout_hashes"

    content_hash: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"), index=True)
    created_ms: Mapped[int] = mapped_column(BigInteger)


class ValidationRecord(Base):
    __tablename__ = "validation_results"
    __table_args__ = (Index(None, "node_id", "passed", "id"),)

    id: Mapped[int] = mapped_column(AUTO_ID, primary_key=True, autoincrement=True)
    group_id: Mapped[str] = mapped_column(GROUP_ID, ForeignKey("groups.group_id"), index=True)
    node_id: Mapped[str] = mapped_column(NODE_ID)
    passed: Mapped[bool] = mapped_column(Boolean)
    check_name: Mapped[str] = mapped_column(String(64))
    evidence_json: Mapped[str] = mapped_column(Text)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    num_groups_consumed: Mapped[int | None] = mapped_column(Integer)


class NodeChunk(Base):
    """The commitment statistics of the chunks of a node's fully checked groups, its newest
    NODE_WINDOW_CHUNKS kept: the coordinator pools them across groups and validators."""

    __tablename__ = "node_chunks"
    __table_args__ = (Index(None, "node_id", "id"),)

    id: Mapped[int] = mapped_column(AUTO_ID, primary_key=True, autoincrement=True)
    node_id: Mapped[str] = mapped_column(NODE_ID)
    group_id: Mapped[str] = mapped_column(GROUP_ID, ForeignKey("groups.group_id"), index=True)
    exponent_mismatches: Mapped[int] = mapped_column(Integer)
    mantissa_error_sum: Mapped[float] = mapped_column(Float)
    num_matched: Mapped[int] = mapped_column(Integer)


class NodeTokens(Base):
    """The sampled-token statistics of a node's fully checked groups (records.TokenStats), its newest
    ones covering the node token window kept: the coordinator pools them across groups and validators."""

    __tablename__ = "node_tokens"
    __table_args__ = (Index(None, "node_id", "id"),)

    id: Mapped[int] = mapped_column(AUTO_ID, primary_key=True, autoincrement=True)
    node_id: Mapped[str] = mapped_column(NODE_ID)
    group_id: Mapped[str] = mapped_column(GROUP_ID, ForeignKey("groups.group_id"), unique=True)
    num_tokens: Mapped[int] = mapped_column(Integer)
    num_near_ties: Mapped[int] = mapped_column(Integer)
    num_directed_near_ties: Mapped[int] = mapped_column(Integer)
    num_near_ties_up: Mapped[int] = mapped_column(Integer)
    num_near_ties_positive: Mapped[int] = mapped_column(Integer)
    near_ties_positive_expected: Mapped[float] = mapped_column(Float)
    near_ties_positive_variance: Mapped[float] = mapped_column(Float)
    logprob_advantage_sum: Mapped[float] = mapped_column(Float)
    logprob_advantage_sum_squares: Mapped[float] = mapped_column(Float)


class NodeTokenTotals(Base):
    """The sampled-token statistics (records.TokenStats) of every group a node ever passed, summed:
    what the lifetime tests of coordinator/node_stats.py judge."""

    __tablename__ = "node_token_totals"

    node_id: Mapped[str] = mapped_column(NODE_ID, primary_key=True)
    num_groups: Mapped[int] = mapped_column(BigInteger)
    num_tokens: Mapped[int] = mapped_column(BigInteger)
    num_near_ties: Mapped[int] = mapped_column(BigInteger)
    num_directed_near_ties: Mapped[int] = mapped_column(BigInteger)
    num_near_ties_up: Mapped[int] = mapped_column(BigInteger)
    num_near_ties_positive: Mapped[int] = mapped_column(BigInteger)
    near_ties_positive_expected: Mapped[float] = mapped_column(Float)
    near_ties_positive_variance: Mapped[float] = mapped_column(Float)
    logprob_advantage_sum: Mapped[float] = mapped_column(Float)
    logprob_advantage_sum_squares: Mapped[float] = mapped_column(Float)


class PolicyVersion(Base):
    __tablename__ = "policy_versions"

    version: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    base_version: Mapped[int] = mapped_column(BigInteger)
    codec: Mapped[int] = mapped_column(Integer)
    signed_manifest: Mapped[bytes] = mapped_column(LargeBinary)
    num_bytes: Mapped[int] = mapped_column(BigInteger)
    full_state_bytes: Mapped[int] = mapped_column(BigInteger)
    created_ms: Mapped[int] = mapped_column(BigInteger)


class TrainerMetrics(Base):
    __tablename__ = "trainer_metrics"

    id: Mapped[int] = mapped_column(AUTO_ID, primary_key=True, autoincrement=True)
    step: Mapped[int] = mapped_column(BigInteger, index=True, unique=True)
    metrics_json: Mapped[str] = mapped_column(Text)
    created_ms: Mapped[int] = mapped_column(BigInteger)


class Contribution(Base):
    __tablename__ = "contributions"
    __table_args__ = (
        Index(None, "node_id", "settled", "voided"),
        Index(None, "settled", "voided", "created_ms"),
    )

    id: Mapped[int] = mapped_column(AUTO_ID, primary_key=True, autoincrement=True)
    node_id: Mapped[str] = mapped_column(NODE_ID)
    group_id: Mapped[str] = mapped_column(GROUP_ID, ForeignKey("groups.group_id"), unique=True)
    num_tokens: Mapped[int] = mapped_column(Integer)
    num_rollouts: Mapped[int] = mapped_column(Integer)
    flops_estimate: Mapped[float] = mapped_column(Float)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    settled: Mapped[bool] = mapped_column(Boolean)
    voided: Mapped[bool] = mapped_column(Boolean)


class EnvelopeNonce(Base):
    """Nonces of signed requests seen within the freshness window, shared by the coordinator's
    replicas so a request replayed to any of them is refused; removed once expired."""

    __tablename__ = "envelope_nonces"

    signer_public_key: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    nonce: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    expires_ms: Mapped[int] = mapped_column(BigInteger, index=True)


metadata = Base.metadata
