"""What the store takes and gives back: frozen records, states, errors, and the pure rules
(node liveness, reputation, allowed group-state changes) the store applies."""

from __future__ import annotations

import dataclasses
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
    """The node already holds the maximum number of open leases; the first of them runs out in
    retry_after_ms (a node restarted without its leases waits that long, not a blind backoff)."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class LeaseCooldownError(ValueError):
    """The node walked away from too many of its recent leases and gets none until until_ms."""

    def __init__(self, message: str, until_ms: int) -> None:
        super().__init__(message)
        self.until_ms = until_ms


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
    # Passed its full check while its node is on probation: held, never trained on, until the node's
    # first node-level verdict (then ready) or its failure (then quarantined).
    PROBATION = "probation"


# For each target state, the states a group may move from. Consumed is final: nothing moves a
# group the trainer used.
GROUP_STATE_SOURCES: dict[GroupState, frozenset[GroupState]] = {
    GroupState.READY: frozenset({GroupState.PENDING_VALIDATION, GroupState.PROBATION}),
    GroupState.CONSUMED: frozenset({GroupState.READY}),
    GroupState.STALE: frozenset({GroupState.READY, GroupState.PENDING_VALIDATION}),
    GroupState.QUARANTINED: frozenset({GroupState.PENDING_VALIDATION, GroupState.READY, GroupState.PROBATION}),
    GroupState.REJECTED: frozenset(
        {GroupState.PENDING_VALIDATION, GroupState.READY, GroupState.QUARANTINED, GroupState.PROBATION}
    ),
    GroupState.PROBATION: frozenset({GroupState.PENDING_VALIDATION, GroupState.READY}),
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
    num_leases_released: int
    num_leases_expired: int
    num_lease_cooldowns: int
    lease_cooldown_until_ms: int
    # Probation: its passed groups are held until a node-level verdict over num_checked_tokens -
    # probation_start_tokens fully checked tokens (new nodes, and nodes a statistical check doubted).
    on_probation: bool
    num_checked_tokens: int
    probation_start_tokens: int

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
    closed_ms: int | None = None


@dataclass(frozen=True)
class WalkAwayLimit:
    """How many of its recent leases a node may release or let expire. More than max_walkaways of
    its last window_leases closed leases (counted since its last cool-down ended) earn a cool-down
    of cooldown_ms without leases; a node that earns another before it closed window_leases leases
    after a cool-down also takes a strike, and is banned at max_strikes."""

    window_leases: int
    max_walkaways: int
    cooldown_ms: int
    max_strikes: int

    def __post_init__(self) -> None:
        if not 0 <= self.max_walkaways < self.window_leases:
            raise ValueError(
                f"need 0 <= max_walkaways < window_leases, got {self.max_walkaways} and {self.window_leases}"
            )
        if self.cooldown_ms < 0 or self.max_strikes < 1:
            raise ValueError("a walk-away limit needs cooldown_ms >= 0 and max_strikes >= 1")


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
    """consumed: marked now (or by an earlier ack of the same step); already_consumed: used by the
    trainer at another step (refused);
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
    num_groups_consumed: int | None = None  # a failure's: the node's groups the trainer had used when caught


@dataclass(frozen=True)
class NewValidation:
    """A full check's result as a validator reports it. A passed group may still leave its node
    suspect (a statistical check over too little evidence to strike): the node goes on probation.
    A window_verdict is a node-level verdict taken with this group (passed: its probation may end)."""

    group_id: str
    passed: bool
    check_name: str
    evidence_json: str
    suspect: bool = False
    window_verdict: bool = False


@dataclass(frozen=True)
class ValidationOutcome:
    """What recording one result did: struck is False for a failure of a submission that had
    failed before (one strike per submission); quarantined and voided count the node's groups
    and credit taken in the same transaction; probation_ended counts the groups it released."""

    result: ValidationResult
    node: NodeRecord
    struck: bool = False
    num_quarantined: int = 0
    num_voided: int = 0
    banned_now: bool = False
    probation_ended: int | None = None


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


@dataclass(frozen=True)
class TokenStats:
    """A fully checked group's sampled-token statistics, in a form that sums across groups (fields as
    in validation.proto's TokenStatistics; tested per node by coordinator/node_stats.py)."""

    num_tokens: int = 0
    num_near_ties: int = 0
    num_directed_near_ties: int = 0
    num_near_ties_up: int = 0
    num_near_ties_positive: int = 0
    near_ties_positive_expected: float = 0.0
    near_ties_positive_variance: float = 0.0
    logprob_advantage_sum: float = 0.0
    logprob_advantage_sum_squares: float = 0.0

    def __add__(self, other: TokenStats) -> TokenStats:
        return TokenStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))


@dataclass(frozen=True)
class TokenWindow:
    """Sums over a node's newest fully checked groups, as many as cover the window's tokens, and over
    every group it passed (lifetime)."""

    node_id: str
    num_groups: int
    stats: TokenStats
    lifetime: TokenStats


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
