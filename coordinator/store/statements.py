"""The store's tables as SQLAlchemy Core tables, and the statements on the hot path, built once
(their parameters are bound per call)."""

from __future__ import annotations

from sqlalchemy import Table, bindparam, delete, func, insert, select, update

from coordinator.store import schema
from coordinator.store.records import LeaseState


def _table(model: type[schema.Base]) -> Table:
    table = model.__table__
    assert isinstance(table, Table), f"{model.__name__} is not mapped to a table"
    return table


NODES = _table(schema.Node)
COUNTERS = _table(schema.Counter)
LEASES = _table(schema.Lease)
REQUEUED = _table(schema.RequeuedPromptSet)
SUBMISSIONS = _table(schema.Submission)
GROUPS = _table(schema.Group)
CONSUMPTIONS = _table(schema.GroupConsumption)
VERDICTS = _table(schema.Verdict)
ROLLOUT_HASHES = _table(schema.RolloutHash)
VALIDATIONS = _table(schema.ValidationRecord)
VERSIONS = _table(schema.PolicyVersion)
METRICS = _table(schema.TrainerMetrics)
CONTRIBUTIONS = _table(schema.Contribution)
NODE_CHUNKS = _table(schema.NodeChunk)
SECRETS = _table(schema.CoordinatorSecret)
NODE_TOKENS = _table(schema.NodeTokens)
NODE_TOKEN_TOTALS = _table(schema.NodeTokenTotals)
NONCES = _table(schema.EnvelopeNonce)

SELECT_RECEIPTS = select(SUBMISSIONS.c.batch_hash, SUBMISSIONS.c.receipt).where(
    SUBMISSIONS.c.batch_hash.in_(bindparam("batch_hashes", expanding=True))
)
SELECT_RECEIPT = select(SUBMISSIONS.c.receipt).where(SUBMISSIONS.c.batch_hash == bindparam("batch_hash"))
SELECT_SEEN_HASHES = select(ROLLOUT_HASHES.c.content_hash).where(
    ROLLOUT_HASHES.c.content_hash.in_(bindparam("content_hashes", expanding=True))
)
SELECT_LEASE = select(LEASES).where(LEASES.c.lease_id == bindparam("lease_id"))
SELECT_NODE = select(NODES).where(NODES.c.node_id == bindparam("node_id"))
SELECT_OPEN_LEASE_DEADLINES = select(LEASES.c.node_id, LEASES.c.deadline_ms).where(
    LEASES.c.node_id.in_(bindparam("node_ids", expanding=True)), LEASES.c.state == LeaseState.OPEN.value
)
LOCK_NODES = (
    select(NODES.c.node_id, NODES.c.lease_cooldown_until_ms)
    .where(NODES.c.node_id.in_(bindparam("node_ids", expanding=True)))
    .order_by(NODES.c.node_id)
    .with_for_update()
)
EXPIRE_LEASES = (
    update(LEASES)
    .where(LEASES.c.state == LeaseState.OPEN.value, LEASES.c.deadline_ms <= bindparam("expire_at_ms"))
    .values(state=LeaseState.EXPIRED.value, closed_ms=bindparam("expire_at_ms"))
    .returning(*LEASES.c)
)
TAKE_LEASE_NUMBERS = (
    update(COUNTERS)
    .where(COUNTERS.c.name == schema.LEASE_COUNTER)
    .values(value=COUNTERS.c.value + bindparam("num_taken"))
    .returning(COUNTERS.c.value)
)
# The oldest requeued sets with the policy version of the lease they come from, unlocked: a
# transaction locks only those it takes (LOCK_REQUEUED), so others take the rest meanwhile.
SELECT_REQUEUED_CANDIDATES = (
    select(REQUEUED.c.id, REQUEUED.c.lease_number, REQUEUED.c.prompt_indices, LEASES.c.policy_version)
    .join(LEASES, LEASES.c.lease_id == REQUEUED.c.source_lease_id)
    .order_by(REQUEUED.c.id)
    .limit(bindparam("num_wanted"))
)
LOCK_REQUEUED = (
    select(REQUEUED.c.id)
    .where(REQUEUED.c.id.in_(bindparam("requeued_ids", expanding=True)))
    .with_for_update(skip_locked=True)
)
SELECT_HELD_LEASE_NUMBERS = select(LEASES.c.node_id, LEASES.c.lease_number).where(
    LEASES.c.node_id.in_(bindparam("node_ids", expanding=True)),
    LEASES.c.lease_number.in_(bindparam("lease_numbers", expanding=True)),
)
DELETE_REQUEUED = delete(REQUEUED).where(REQUEUED.c.id.in_(bindparam("requeued_ids", expanding=True)))
COUNT_GROUPS_IN_STATES = select(func.count()).where(GROUPS.c.state.in_(bindparam("states", expanding=True)))
INSERT_LEASES = insert(LEASES)
INSERT_SUBMISSIONS = insert(SUBMISSIONS).returning(SUBMISSIONS.c.id, sort_by_parameter_order=True)
INSERT_GROUPS = insert(GROUPS)
INSERT_CONTRIBUTIONS = insert(CONTRIBUTIONS)
INSERT_VERDICTS = insert(VERDICTS)
INSERT_ROLLOUT_HASHES = insert(ROLLOUT_HASHES)
UPDATE_NODE_COUNTS = (
    update(NODES)
    .where(NODES.c.node_id == bindparam("counted_node_id"))
    .values(
        num_rollouts_accepted=NODES.c.num_rollouts_accepted + bindparam("num_newly_accepted"),
        num_rollouts_rejected=NODES.c.num_rollouts_rejected + bindparam("num_newly_rejected"),
    )
)
CLOSE_SUBMITTED_LEASE = (
    update(LEASES)
    .where(
        LEASES.c.lease_id == bindparam("submitted_lease_id"),
        LEASES.c.node_id == bindparam("submitter_id"),
        LEASES.c.state == LeaseState.OPEN.value,
    )
    .values(state=LeaseState.SUBMITTED.value, closed_ms=bindparam("submitted_ms"))
)
