"""The coordinator's logic, independent of gRPC: registration and liveness, leases,
submissions with their cheap checks, the trainer's group stream, publishing, admin.

Methods are synchronous and thread-safe (the store is); the gRPC layer runs them in a
thread pool. Every accepted submission is committed before its receipt is returned.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from google.protobuf.message import DecodeError

from coordinator.checks import LeaseRejection, LeaseView, RunFacts, check_lease, check_rollouts, truncated_message
from coordinator.config import CoordinatorConfig
from coordinator.gate import RefusalCounts
from coordinator.rpc_metrics import rpc_latency_histogram
from coordinator.scheduler import LeasePlan, Scheduler
from coordinator.store import (
    DuplicateRolloutError,
    GroupState,
    LeaseCooldownError,
    LeaseRecord,
    LeaseState,
    Liveness,
    NewGroup,
    NewSubmission,
    NewVerdict,
    NodeRecord,
    Store,
)
from coordinator.verdicts import declared_dtype
from coordinator.versions import PolicyVersions
from envs import Problem, Split, Task
from envs.base import MultiTurnTask, RolloutEnvironment
from policy.scoring import completion_text
from protocol import commitment, convert
from protocol.convert import WireFormatError
from protocol.envelope import now_ms
from protocol.proto import rollout_pb2
from protocol.sampling import derive_sample_seed
from protocol.types import (
    LeasedPrompt,
    ReadyGroup,
    Receipt,
    RejectReason,
    Rollout,
    RolloutBatch,
    RolloutVerdict,
    WorkLease,
)

log = logging.getLogger(__name__)

MAX_LEASE_ID_CHARS = 64
# Pending credit settles this long after its group was accepted, once the group is past its checks.
SETTLE_WINDOW_MS = 10 * 60 * 1000


class InvalidRequestError(ValueError):
    """The request is well signed but its content is malformed."""


def commitment_bytes(num_tokens: int) -> int:
    return -(-num_tokens // commitment.CHUNK_TOKENS) * commitment.PROOF_BYTES


@dataclass(frozen=True)
class RunSetup:
    """What the coordinator knows about the run besides its config."""

    task: Task
    tokenizer: Any
    model_name: str
    vocab_size: int
    eos_token_id: int
    num_parameters: int
    trainer_public_key: bytes


@dataclass(frozen=True)
class LeaseWait:
    """No lease now: why, and when the node should ask again."""

    reason: str
    retry_after_ms: int


# A node that must pull a newer version asks again at once, after pulling it; a full backlog drains at
# the trainer's pace, a fraction of a second a step on the embedded run.
BACKLOG_RETRY_MS = 250
NO_POLICY_RETRY_MS = 1000


@dataclass(frozen=True)
class SubmitResult:
    receipt: Receipt
    receipt_bytes: bytes
    newly_stored: bool


class Coordinator:
    def __init__(
        self,
        config: CoordinatorConfig,
        store: Store,
        setup: RunSetup,
        policy: PolicyVersions,
        *,
        clock: Callable[[], int] = now_ms,
        needs_validation: Callable[[NodeRecord | None], bool] | None = None,
    ):
        self.config = config
        self.store = store
        self.policy = policy
        self.policy.on_publish.append(self._published)
        self.p2p_bootstrap: tuple[str, ...] = ()
        self.refusals = RefusalCounts()  # requests the gRPC layer refused, for /metrics
        self.rpc_latency = rpc_latency_histogram()
        self.dashboard_url = ""  # the HTTP address contributors reach, once serving
        self._latest_version: int | None = None
        self._beats: dict[str, tuple[str, int, float, int]] = {}
        self._beats_lock = threading.Lock()
        self.setup = setup
        self.clock = clock
        self.needs_validation = needs_validation
        self.scheduler = Scheduler(store, LeasePlan.from_config(config, config.run.num_prompts))
        heartbeat_ms = round(config.heartbeat_interval_s * 1000)
        self.liveness = Liveness(stale_after_ms=3 * heartbeat_ms, offline_after_ms=10 * heartbeat_ms)
        self.facts = RunFacts(
            vocab_size=setup.vocab_size,
            eos_token_id=setup.eos_token_id,
            commitment_bytes=commitment_bytes,
            environment_of=self._environment if isinstance(setup.task, MultiTurnTask) else None,
        )
        self._problem = lru_cache(maxsize=65536)(self._build_problem)
        self._prompt = lru_cache(maxsize=65536)(self._build_prompt)

    # ---- run ----

    def latest_policy_version(self) -> int:
        """Read from the store once, then kept current by the publish hook."""
        if self._latest_version is None:
            latest = self.store.latest_version()
            self._latest_version = 0 if latest is None else latest.version
        return self._latest_version

    def _published(self, signed) -> None:
        self._latest_version = None

    def _build_problem(self, prompt_index: int) -> Problem:
        return self.setup.task.problem(Split.TRAIN, self.config.run.seed, prompt_index)

    def _build_prompt(self, prompt_index: int) -> LeasedPrompt:
        problem = self._problem(prompt_index)
        token_ids = tuple(self.setup.tokenizer.encode(problem.prompt))
        return LeasedPrompt(prompt_index=prompt_index, prompt_text=problem.prompt, prompt_token_ids=token_ids)

    def prompt(self, prompt_index: int) -> LeasedPrompt:
        return self._prompt(prompt_index)

    # ---- nodes ----

    def register(
        self, node_id: str, public_key: bytes, display_name: str, engine: str, hardware: str, software_version: str
    ) -> NodeRecord:
        """Register (or re-register) a node; its engine declares the precision its work is checked in, which
        must be one the run accepts (validation.precisions)."""
        precision = declared_dtype(engine)
        accepted = self.config.validation.precisions
        if self.config.validation.enabled and precision not in accepted:
            raise InvalidRequestError(
                f"engine {engine[:64]!r} computes in {precision}, and this run accepts nodes computing in "
                f"{', '.join(accepted)} only: set the node's engine.dtype to one of them"
            )
        return self.store.register_node(
            node_id, public_key, display_name[:64], engine[:64], hardware[:128], software_version[:64], self.clock()
        )

    def heartbeat(self, node_id: str, policy_version: int, tokens_per_s: float) -> None:
        """Liveness is kept in memory and written in batches (flush_heartbeats, every second), so
        heartbeats from many thousands of nodes cost one transaction a second."""
        with self._beats_lock:
            self._beats[node_id] = (node_id, policy_version, max(0.0, float(tokens_per_s)), self.clock())

    def flush_heartbeats(self) -> int:
        with self._beats_lock:
            beats, self._beats = list(self._beats.values()), {}
        self.store.record_heartbeats(beats)
        return len(beats)

    def node_state(self, node: NodeRecord):
        return node.state(self.clock(), self.liveness)

    # ---- leases ----

    def to_work_lease(self, record: LeaseRecord) -> WorkLease:
        return WorkLease(
            lease_id=record.lease_id,
            node_id=record.node_id,
            task=self.config.run.task,
            policy_version=record.policy_version,
            prompts=tuple(self.prompt(i) for i in record.prompt_indices),
            group_size=record.group_size,
            sampling=record.sampling,
            sampling_seed=record.sampling_seed,
            deadline_ms=record.deadline_ms,
        )

    def lease(self, node_id: str, held_version: int) -> WorkLease | LeaseWait:
        """A lease at the policy version the node holds, when that is the latest or at most
        k − 1 versions behind it (k = run.max_staleness: its groups stay usable for at least one
        more trainer step, and a node that finishes just as the trainer publishes need not wait
        for the pull); otherwise why not and when to ask again."""
        latest = self.latest_policy_version()
        if latest == 0:
            return LeaseWait("no policy has been published yet", NO_POLICY_RETRY_MS)
        oldest_leasable = latest - max(0, self.config.run.max_staleness - 1)
        if not oldest_leasable <= held_version <= latest:
            return LeaseWait(f"pull policy version {latest} first (held: {held_version})", 0)
        if self.backlog_full():
            return LeaseWait("the backlog of groups for the trainer is full", BACKLOG_RETRY_MS)
        now = self.clock()
        try:
            record = self.scheduler.issue(node_id, held_version, now, oldest_leasable_version=oldest_leasable)
        except LeaseCooldownError as cooldown:
            return LeaseWait(str(cooldown), cooldown.until_ms - now)
        return self.to_work_lease(record)

    def backlog_full(self) -> bool:
        """Back-pressure: work the trainer cannot use before it goes stale is not leased."""
        limit = self.config.run.max_backlog_groups
        if not limit:
            return False
        return self.store.count_groups((GroupState.READY, GroupState.PENDING_VALIDATION)) >= limit

    def release(self, node_id: str, lease_id: str) -> bool:
        record = self.store.get_lease(lease_id)
        if record is None or record.node_id != node_id:
            raise InvalidRequestError(f"lease {lease_id!r} is not held by {node_id}")
        return self.scheduler.release(lease_id, self.clock())

    def extend_open_leases(self) -> int:
        """After a restart: leases open when the coordinator stopped get a full deadline again."""
        return self.store.extend_open_leases(self.clock() + self.scheduler.plan.deadline_ms)

    def expire_leases(self) -> int:
        return len(self.scheduler.expire(self.clock()))

    # ---- submissions ----

    def _completion(self, rollout: Rollout) -> str:
        """The transcript the reward scores: every token, of the model's and (multi-turn tasks, checked
        against what the environment says before the reward counts) of the environment's turns."""
        return completion_text(self.setup.tokenizer, list(rollout.token_ids))

    def _environment(self, lease: WorkLease, prompt_index: int, sample_index: int) -> RolloutEnvironment:
        """A multi-turn task's environment for one rollout, as the node's (node/generate.py)."""
        assert isinstance(self.setup.task, MultiTurnTask)
        position = next(i for i, prompt in enumerate(lease.prompts) if prompt.prompt_index == prompt_index)
        seed = derive_sample_seed(lease.sampling_seed, position, sample_index)
        return self.setup.task.environment(self._problem(prompt_index), seed, self.setup.tokenizer)

    def _rewards(self, scored: Sequence[tuple[LeasedPrompt, Rollout]]) -> list[float]:
        """`rewards_of` for the checks: the task's rewards of these rollouts, computed together, so that a
        task that runs code runs them concurrently (in its sandbox pool)."""
        problems = [self._problem(prompt.prompt_index) for prompt, _ in scored]
        return self.setup.task.rewards(problems, [self._completion(rollout) for _, rollout in scored])

    def submit(self, node_id: str, payload: bytes) -> SubmitResult:
        batch_hash = hashlib.sha256(payload).digest()
        try:
            message = rollout_pb2.RolloutBatch.FromString(payload)
        except DecodeError as error:
            raise InvalidRequestError(f"malformed RolloutBatch: {error}") from None
        if len(message.lease_id) > MAX_LEASE_ID_CHARS:
            raise InvalidRequestError(
                f"malformed RolloutBatch: lease_id has {len(message.lease_id)} characters, at most {MAX_LEASE_ID_CHARS}"
            )
        record = self.store.get_lease(message.lease_id)
        self._check_batch_size(message, record)
        try:
            convert.check_bounds(message)
            batch = convert.batch_from_proto(message)
        except WireFormatError as error:
            raise InvalidRequestError(f"malformed RolloutBatch: {error}") from None
        # Accepted groups are stored as the node's own messages, less any field the protocol lacks.
        message.DiscardUnknownFields()
        if record is None or record.state is not LeaseState.OPEN or record.node_id != node_id:
            # Storing a batch closes its node's lease, so only then can this be a re-send.
            stored = self.store.get_receipt(batch_hash)
            if stored is not None:
                return self._stored_result(stored)
        now = self.clock()
        try:
            lease = check_lease(
                batch,
                None if record is None else LeaseView(self.to_work_lease(record), record.state.value),
                node_id,
                now,
            )
        except LeaseRejection as rejection:
            log.warning("refused batch of %s: %s", node_id, rejection)
            receipt = _reject_all(batch, batch_hash, rejection.reason, str(rejection))
            outcome = self.store.record_submission(_rejected_submission(node_id, batch, batch_hash, receipt, now))
            return SubmitResult(receipt, outcome.receipt, outcome.newly_stored)
        # Copies of stored rollouts are found by the write, which refuses the submission with
        # their hashes; the batch is then checked again with those marked as duplicates.
        copies: set[bytes] = set()
        while True:
            checked = check_rollouts(
                batch, lease, self.facts, rewards_of=self._rewards, already_seen=copies.intersection
            )
            submission, receipt = self._submission(node_id, batch, message, batch_hash, checked, now)
            try:
                outcome = self.store.record_submission(submission)
            except DuplicateRolloutError as duplicate:
                copies |= duplicate.hashes
                continue
            if not outcome.newly_stored:
                return self._stored_result(outcome.receipt)
            for group_check in checked:
                if group_check.accepted:
                    group = batch.groups[group_check.group_index]
                    self.scheduler.pass_rates.record(group.prompt_index, [r.claimed_reward for r in group.rollouts])
            return SubmitResult(receipt, outcome.receipt, True)

    def _check_batch_size(self, message: rollout_pb2.RolloutBatch, record: LeaseRecord | None) -> None:
        """Refuse, before any per-rollout work, a batch with more groups or rollouts than its lease
        has prompts and samples (a lease the store lacks: than this run's leases)."""
        num_prompts = self.config.run.prompts_per_lease if record is None else len(record.prompt_indices)
        group_size = self.config.run.group_size if record is None else record.group_size
        if len(message.groups) > num_prompts:
            raise InvalidRequestError(
                f"malformed RolloutBatch: groups: {len(message.groups)} groups, the lease has {num_prompts} prompts"
            )
        for index, group in enumerate(message.groups):
            if len(group.rollouts) > group_size:
                raise InvalidRequestError(
                    f"malformed RolloutBatch: groups[{index}].rollouts: {len(group.rollouts)} rollouts, "
                    f"the lease's group size is {group_size}"
                )

    def _group_state(self, node_id: str) -> GroupState:
        if self.needs_validation is not None and self.needs_validation(self.store.get_node(node_id)):
            return GroupState.PENDING_VALIDATION
        return GroupState.READY

    def _submission(
        self, node_id, batch: RolloutBatch, message: rollout_pb2.RolloutBatch, batch_hash: bytes, checked, now: int
    ):
        state = self._group_state(node_id)
        groups, verdicts, hashes = [], [], []
        for group_check in checked:
            group = batch.groups[group_check.group_index]
            verdicts.extend(group_check.verdicts)
            if not group_check.accepted:
                continue
            num_tokens = sum(len(r.token_ids) for r in group.rollouts)
            groups.append(
                NewGroup(
                    group_id=f"{batch.lease_id}-{group.prompt_index}",
                    prompt_index=group.prompt_index,
                    policy_version=batch.policy_version,
                    group_bytes=message.groups[group_check.group_index].SerializeToString(),
                    num_tokens=num_tokens,
                    num_rollouts=len(group.rollouts),
                    state=state,
                    flops_estimate=2.0 * self.setup.num_parameters * num_tokens,
                )
            )
            hashes.extend(group_check.content_hashes)
        receipt = Receipt(lease_id=batch.lease_id, batch_hash=batch_hash, verdicts=tuple(verdicts))
        receipt_bytes = convert.receipt_to_proto(receipt).SerializeToString()
        submission = NewSubmission(
            batch_hash=batch_hash,
            lease_id=batch.lease_id,
            node_id=node_id,
            created_ms=now,
            receipt=receipt_bytes,
            groups=tuple(groups),
            verdicts=tuple(
                NewVerdict(v.prompt_index, v.sample_index, v.accepted, v.reason, v.message) for v in verdicts
            ),
            rollout_hashes=tuple(hashes),
        )
        return submission, receipt

    @staticmethod
    def _stored_result(receipt_bytes: bytes) -> SubmitResult:
        receipt = convert.receipt_from_proto(rollout_pb2.Receipt.FromString(receipt_bytes))
        return SubmitResult(receipt, receipt_bytes, False)

    def run_counters(self):
        return self.store.run_counters(self.clock() - self.liveness.stale_after_ms)

    def versions_with_holders(self):
        return self.store.list_versions(), self.store.num_nodes_holding(self.clock() - self.liveness.offline_after_ms)

    # ---- trainer ----

    def ready_groups(self, max_groups: int, max_staleness: int) -> tuple[list[ReadyGroup], int]:
        """Ready groups within the staleness bound, oldest first; older ones are marked stale.
        Returns the groups and the number newly marked stale."""
        min_version = max(0, self.latest_policy_version() - max_staleness)
        num_stale = self.store.mark_stale_below(min_version, self.clock())
        groups = []
        for stored in self.store.ready_groups(min_version, max_groups):
            prompt = self.prompt(stored.prompt_index)
            group = convert.group_from_proto(rollout_pb2.RolloutGroup.FromString(stored.group_bytes))
            groups.append(
                ReadyGroup(
                    group_id=stored.group_id,
                    policy_version=stored.policy_version,
                    prompt_index=stored.prompt_index,
                    prompt_token_ids=prompt.prompt_token_ids,
                    group=group,
                    node_id=stored.node_id,
                )
            )
        return groups, num_stale

    def resume_trainer(self, trainer_step: int) -> int:
        num_restored = self.store.restore_consumed_after(trainer_step, self.clock())
        log.warning(
            "trainer resumed at step %d: %d groups consumed after it are ready again", trainer_step, num_restored
        )
        return num_restored

    def ack(self, consumed: Sequence[str], stale: Sequence[str], trainer_step: int):
        now = self.clock()
        outcome = self.store.mark_consumed(list(consumed), trainer_step, now)
        num_stale = self.store.mark_stale(list(stale), now) if stale else 0
        if outcome.already_consumed:
            log.error("trainer step %d re-used consumed groups %s", trainer_step, outcome.already_consumed)
        return outcome, num_stale


def _rejected_submission(
    node_id: str, batch: RolloutBatch, batch_hash: bytes, receipt: Receipt, now: int
) -> NewSubmission:
    """A batch refused as a whole: stored for the contributor's record, with no groups."""
    return NewSubmission(
        batch_hash=batch_hash,
        lease_id=batch.lease_id[:MAX_LEASE_ID_CHARS],
        node_id=node_id,
        created_ms=now,
        receipt=convert.receipt_to_proto(receipt).SerializeToString(),
        groups=(),
        verdicts=tuple(
            NewVerdict(v.prompt_index, v.sample_index, False, v.reason, v.message) for v in receipt.verdicts
        ),
        rollout_hashes=(),
    )


def _reject_all(batch: RolloutBatch, batch_hash: bytes, reason: RejectReason, message: str) -> Receipt:
    """Every rollout rejected for `reason`; the message is told once, on the first verdict."""
    rollouts = [(g.prompt_index, r.sample_index) for g in batch.groups for r in g.rollouts]
    return Receipt(
        lease_id=batch.lease_id,
        batch_hash=batch_hash,
        verdicts=tuple(
            RolloutVerdict(prompt_index, sample_index, False, reason, "" if index else truncated_message(message))
            for index, (prompt_index, sample_index) in enumerate(rollouts)
        ),
    )
