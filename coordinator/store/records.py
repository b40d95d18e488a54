"""What the store takes and gives back: frozen records, states, errors, and the pure rules
(node liveness, reputation, allowed group-state changes) the store applies."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocol.types import Codec, NodeState, RejectReason, SamplingParams

# A node's reputation is num_passed / (num_passed + REPUTATION_PRIOR), halved per strike: ten
# passed full checks reach 0.5, and a failed one costs more than many passes earn.
REPUTATION_PRIOR = 10


class UnknownNodeError(ValueError):
    """The node id is not registered."""


class NodeKeyMismatchError(ValueError):
    """A node id was registered again with a different public key."""


class UnknownLeaseError(ValueError):
    """The lease id does not exist."""


class LeaseCapError(ValueError):
    """The node already holds the maximum number of open leases."""


class DuplicateRolloutError(ValueError):
    """Rollout content hashes of a submission are already stored (a replay or a copy)."""

    def __init__(self, hashes: frozenset[bytes]) -> None:
        super().__init__(
            f"{len(hashes)} rollout(s) of this submission are already stored; "
            "reject them as duplicates and record the submission again"
        )
        self.hashes = hashes


class VersionExistsError(ValueError):
    """A policy version with this number is already stored."""


class LeaseState(enum.StrEnum):
    OPEN = "open"
    SUBMITTED = "submitted"
    RELEASED = "released"
    EXPIRED = "expired"


class GroupState(enum.StrEnum):
    PENDING_VALIDATION = "pending_validation"
    READY = "ready"
    CONSUMED = "consumed"
    STALE = "stale"
    QUARANTINED = "quarantined"
    REJECTED = "rejected"


# For each target state, the states a group may move from. Consumed is final: nothing moves a
# group the trainer used.
GROUP_STATE_SOURCES: dict[GroupState, frozenset[GroupState]] = {
    GroupState.READY: frozenset({GroupState.PENDING_VALIDATION}),
    GroupState.CONSUMED: frozenset({GroupState.READY}),
    GroupState.STALE: frozenset({GroupState.READY, GroupState.PENDING_VALIDATION}),
    GroupState.QUARANTINED: frozenset({GroupState.PENDING_VALIDATION, GroupState.READY}),
    GroupState.REJECTED: frozenset({GroupState.PENDING_VALIDATION, GroupState.READY, GroupState.QUARANTINED}),
}


@dataclass(frozen=True)
class Liveness:
    """A node is online until stale_after_ms without a heartbeat, stale until offline_after_ms."""

    stale_after_ms: int
    offline_after_ms: int

    def __post_init__(self) -> None:
        if not 0 < self.stale_after_ms <= self.offline_after_ms:
            raise ValueError(
                f"need 0 < stale_after_ms <= offline_after_ms, got {self.stale_after_ms} and {self.offline_after_ms}"
            )


def node_state(banned: bool, last_seen_ms: int, now_ms: int, liveness: Liveness) -> NodeState:
    if banned:
        return NodeState.BANNED
    silent_ms = now_ms - last_seen_ms
    if silent_ms < liveness.stale_after_ms:
        return NodeState.ONLINE
    if silent_ms < liveness.offline_after_ms:
        return NodeState.STALE
    return NodeState.OFFLINE


def reputation(num_full_checks_passed: int, num_strikes: int) -> float:
    return num_full_checks_passed / (num_full_checks_passed + REPUTATION_PRIOR) * 0.5**num_strikes


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    public_key: bytes
    display_name: str
    engine: str
    hardware: str
    software_version: str
    registered_ms: int
    last_seen_ms: int
    policy_version: int
    tokens_per_s: float
    banned: bool
    ban_reason: str
    num_full_checks_passed: int
    num_full_checks_failed: int
    num_strikes: int
    reputation: float
    num_rollouts_accepted: int
    num_rollouts_rejected: int

    def state(self, now_ms: int, liveness: Liveness) -> NodeState:
        return node_state(self.banned, self.last_seen_ms, now_ms, liveness)


@dataclass(frozen=True)
class LeaseRecord:
    lease_id: str
    node_id: str
    lease_number: int
    prompt_indices: tuple[int, ...]
    group_size: int
    sampling: SamplingParams
    sampling_seed: int
    policy_version: int
    created_ms: int
    deadline_ms: int
    state: LeaseState = LeaseState.OPEN


@dataclass(frozen=True)
class RequeuedPrompts:
    """The prompts of a lease that expired or was released, to be leased again first."""

    lease_number: int
    prompt_indices: tuple[int, ...]


@dataclass(frozen=True)
class NewGroup:
    """An accepted group as the service stores it; group_bytes is its serialized RolloutGroup."""

    group_id: str
    prompt_index: int
    policy_version: int
    group_bytes: bytes
    num_tokens: int
    num_rollouts: int
    state: GroupState
    flops_estimate: float

    def __post_init__(self) -> None:
        if self.state not in (GroupState.PENDING_VALIDATION, GroupState.READY):
            raise ValueError(f"a new group is pending_validation or ready, not {self.state}")


@dataclass(frozen=True)
class NewVerdict:
    prompt_index: int
    sample_index: int
    accepted: bool
    reason: RejectReason | None = None
    message: str = ""
    evidence_json: str = ""


@dataclass(frozen=True)
class NewSubmission:
    """Everything one accepted-or-rejected batch leaves in the store, written in one transaction.

    rollout_hashes are the content hashes of the accepted rollouts (for duplicate detection)."""

    batch_hash: bytes
    lease_id: str
    node_id: str
    created_ms: int
    receipt: bytes
    groups: tuple[NewGroup, ...]
    verdicts: tuple[NewVerdict, ...]
    rollout_hashes: tuple[bytes, ...]


@dataclass(frozen=True)
class SubmissionOutcome:
    """The receipt to send; newly_stored is False when the batch was stored before (a re-send)."""

    receipt: bytes
    newly_stored: bool


@dataclass(frozen=True)
class SubmissionRecord:
    batch_hash: bytes
    lease_id: str
    node_id: str
    created_ms: int
    num_accepted: int
    num_rejected: int


@dataclass(frozen=True)
class StoredGroup:
    group_id: str
    lease_id: str
    node_id: str
    prompt_index: int
    policy_version: int
    group_bytes: bytes
    num_tokens: int
    num_rollouts: int
    state: GroupState
    verified: bool
    created_ms: int


@dataclass(frozen=True)
class ConsumeOutcome:
    """consumed: marked now; already_consumed: used by the trainer before (refused);
    refused: unknown or not ready (pending, stale, quarantined, rejected)."""

    consumed: tuple[str, ...]
    already_consumed: tuple[str, ...]
    refused: tuple[str, ...]


@dataclass(frozen=True)
class Consumption:
    group_id: str
    trainer_step: int
    consumed_ms: int


@dataclass(frozen=True)
class ValidationResult:
    group_id: str
    node_id: str
    passed: bool
    check_name: str
    evidence_json: str
    created_ms: int


@dataclass(frozen=True)
class ChunkStats:
    """One checked chunk's commitment statistics, in a form that sums: mismatched exponents, the
    mantissa error summed over the points whose exponents matched, and how many did."""

    exponent_mismatches: int
    mantissa_error_sum: float
    num_matched: int


@dataclass(frozen=True)
class ChunkWindow:
    """Sums over a node's newest checked chunks, at most the window's size of them."""

    node_id: str
    num_chunks: int
    exponent_mismatches: int
    mantissa_error_sum: float
    num_matched: int


class RejectionSource(enum.StrEnum):
    SUBMISSION = "submission"
    VALIDATION = "validation"


@dataclass(frozen=True)
class RejectionRecord:
    """One rejection shown to a contributor: a cheap-check verdict (reason is a RejectReason
    name) or a failed full check (reason is the check name, sample_index is None)."""

    node_id: str
    source: RejectionSource
    reason: str
    message: str
    evidence_json: str
    prompt_index: int
    sample_index: int | None
    created_ms: int


@dataclass(frozen=True)
class PolicyVersionRecord:
    version: int
    base_version: int
    codec: Codec
    signed_manifest: bytes
    num_bytes: int
    full_state_bytes: int
    created_ms: int


@dataclass(frozen=True)
class MetricsRecord:
    step: int
    metrics_json: str
    created_ms: int


@dataclass(frozen=True)
class WorkTotals:
    num_entries: int = 0
    num_tokens: int = 0
    num_rollouts: int = 0
    flops_estimate: float = 0.0


@dataclass(frozen=True)
class ContributionBucket:
    """A node's work that is not voided (settled or pending), created in [start_ms, start_ms + bucket_ms)."""

    start_ms: int
    work: WorkTotals


@dataclass(frozen=True)
class ContributionTotals:
    node_id: str
    settled: WorkTotals
    pending: WorkTotals
    voided: WorkTotals


@dataclass(frozen=True)
class RunCounters:
    num_nodes_online: int
    num_rollouts_accepted: int
    num_rollouts_rejected: int
    num_groups: dict[GroupState, int]
    trainer_step: int
    latest_policy_version: int
