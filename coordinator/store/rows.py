"""Row mapping: database rows to the store's records, and a lease record to its row."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row

from coordinator.store.records import GroupState, LeaseRecord, LeaseState, NodeRecord, PolicyVersionRecord, StoredGroup
from coordinator.store.statements import GROUPS
from protocol.types import Codec, SamplingParams

# A row of any statement's result.
AnyRow = Row[*tuple[Any, ...]]


def node_record(row: AnyRow) -> NodeRecord:
    return NodeRecord(
        node_id=row.node_id,
        public_key=bytes(row.public_key),
        display_name=row.display_name,
        engine=row.engine,
        hardware=row.hardware,
        software_version=row.software_version,
        registered_ms=row.registered_ms,
        last_seen_ms=row.last_seen_ms,
        policy_version=row.policy_version,
        tokens_per_s=row.tokens_per_s,
        banned=row.banned,
        ban_reason=row.ban_reason,
        num_full_checks_passed=row.num_full_checks_passed,
        num_full_checks_failed=row.num_full_checks_failed,
        num_strikes=row.num_strikes,
        reputation=row.reputation,
        num_rollouts_accepted=row.num_rollouts_accepted,
        num_rollouts_rejected=row.num_rollouts_rejected,
        num_leases_released=row.num_leases_released,
        num_leases_expired=row.num_leases_expired,
        num_lease_cooldowns=row.num_lease_cooldowns,
        lease_cooldown_until_ms=row.lease_cooldown_until_ms,
        on_probation=row.on_probation,
        num_checked_tokens=row.num_checked_tokens,
        probation_start_tokens=row.probation_start_tokens,
    )


def lease_record(row: AnyRow) -> LeaseRecord:
    return LeaseRecord(
        lease_id=row.lease_id,
        node_id=row.node_id,
        lease_number=row.lease_number,
        prompt_indices=tuple(row.prompt_indices),
        group_size=row.group_size,
        sampling=SamplingParams(
            temperature=row.temperature, top_k=row.top_k, top_p=row.top_p, max_tokens=row.max_tokens
        ),
        sampling_seed=row.sampling_seed,
        policy_version=row.policy_version,
        created_ms=row.created_ms,
        deadline_ms=row.deadline_ms,
        state=LeaseState(row.state),
        closed_ms=row.closed_ms,
    )


def lease_row(lease: LeaseRecord) -> dict[str, Any]:
    return {
        "lease_id": lease.lease_id,
        "node_id": lease.node_id,
        "lease_number": lease.lease_number,
        "prompt_indices": list(lease.prompt_indices),
        "group_size": lease.group_size,
        "temperature": lease.sampling.temperature,
        "top_k": lease.sampling.top_k,
        "top_p": lease.sampling.top_p,
        "max_tokens": lease.sampling.max_tokens,
        "sampling_seed": lease.sampling_seed,
        "policy_version": lease.policy_version,
        "created_ms": lease.created_ms,
        "deadline_ms": lease.deadline_ms,
        "state": lease.state.value,
        "closed_ms": None,
    }


def group_record(row: AnyRow) -> StoredGroup:
    return StoredGroup(
        group_id=row.group_id,
        lease_id=row.lease_id,
        node_id=row.node_id,
        prompt_index=row.prompt_index,
        policy_version=row.policy_version,
        group_bytes=bytes(row.group_bytes),
        num_tokens=row.num_tokens,
        num_rollouts=row.num_rollouts,
        state=GroupState(row.state),
        verified=row.verified,
        created_ms=row.created_ms,
    )


def version_record(row: AnyRow) -> PolicyVersionRecord:
    return PolicyVersionRecord(
        version=row.version,
        base_version=row.base_version,
        codec=Codec(row.codec),
        signed_manifest=bytes(row.signed_manifest),
        num_bytes=row.num_bytes,
        full_state_bytes=row.full_state_bytes,
        created_ms=row.created_ms,
    )


GROUP_COLUMNS = (
    GROUPS.c.group_id,
    GROUPS.c.lease_id,
    GROUPS.c.node_id,
    GROUPS.c.prompt_index,
    GROUPS.c.policy_version,
    GROUPS.c.group_bytes,
    GROUPS.c.num_tokens,
    GROUPS.c.num_rollouts,
    GROUPS.c.state,
    GROUPS.c.verified,
    GROUPS.c.created_ms,
)
