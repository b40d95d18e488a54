"""Full re-verification of sampled submissions, and what a failure costs the node.

For a group of a sampled submission the validator rebuilds the policy at the version the
group claims (coordinator/policy_history.py), prefills prompt + completion once, and checks
every rollout (coordinator/verdicts.py): each token against the seeded sampling rule, the
reported log-probabilities within a drift, the activation commitment per chunk and pooled over
the group, and termination. The prompt is the coordinator's, never the node's. The coordinator
then judges each node over its recent groups (its chunk and token windows, its rate of doubts)
and applies the verdicts.

Validators take that work from the coordinator's ValidationQueue under leases: the one inside the
coordinator, and any number of `rollproof validator run` processes (coordinator/validator_worker.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator import node_stats
from coordinator.policy_history import PolicyHistory
from coordinator.store import (
    ChunkStats,
    ChunkWindow,
    GroupState,
    NewValidation,
    NodeRecord,
    Store,
    StoredGroup,
    TokenStats,
    ValidationOutcome,
)
from coordinator.verdicts import (
    TOLERANCES,
    GroupJob,
    Tolerances,
    Verdict,
    declared_dtype,
    group_verdict,
    pooled_verdict,
)
from protocol import commitment, convert
from protocol import sampling as rule
from protocol.codec import BF16State
from protocol.proto import rollout_pb2, validation_pb2
from protocol.types import LeasedPrompt

log = logging.getLogger(__name__)

# How long a validator holds the groups it took before they are handed to another one.
DEFAULT_VALIDATION_LEASE_MS = 5 * 60 * 1000
# A node's last fully checked chunks, pooled by the coordinator across its groups and validators (kept
# in the store): a deviation too small for one group's chunks (a group of short rollouts has fewer chunks
# than a pooled check needs) shows over the node's many groups, judged against the same pooled bounds.
# Measured in bf16 on the default tiny model over 256 chunks: an honest node 0.21 pooled mantissa error,
# int8 linear layers 0.95, one layer x 1.05 0.75; an honest vLLM node replayed by torch at most 0.64 in
# any window of 256 of its 3,000 chunks; allowed 0.75.
NODE_WINDOW_CHUNKS = 256
# Probation: a node's groups become trainable only after its first node-level verdict, taken once it
# has PROBATION_TOKENS fully checked tokens and its window holds at least MIN_WINDOW_CHUNKS chunks.
# Until then every submission of it is fully checked and its passed groups are held. Measured on the
# default tiny model, honest bf16 nodes generating with eager attention replayed with SDPA (12,000
# rollouts, 60,163 tokens, 12,000 chunks): windows of 64 chunks failed 2 of 747 times (pooled mantissa
# error up to 0.79 against 0.75 allowed), of 96 chunks 0 of 497 (at most 0.72), of 128 chunks 0 of 372
# (at most 0.65), of 256 chunks 0 of 184 (at most 0.61); exponent mismatches were never close (at most
# 1.14 a chunk against 3.0); an honest vLLM bf16 node replayed by torch stayed at or below 0.64 in
# windows of 256. So a probation verdict is taken over 128 chunks at least, where no honest torch window
# came within 0.1 of the bound, and may release the node's groups there; over the bound there, it only
# keeps the node on probation, and fails it once the window is full (NODE_WINDOW_CHUNKS). The node's
# token window (coordinator/node_stats.py) must have been judged and passed too, which takes
# NODE_WINDOW_TOKENS tokens: a bf16 node steering its near-ties passes every chunk check.
PROBATION_TOKENS = node_stats.NODE_WINDOW_TOKENS
MIN_WINDOW_CHUNKS = 128
# Doubts (passes in doubt, of any check) over a node's last DOUBT_WINDOW_GROUPS full checks, held to a
# binomial tail against HONEST_DOUBT_RATE_BOUND per group. Measured: 10 doubts in 9,768 honest bf16
# groups replayed on the other attention kernel (1.0e-3 a group: protocol/sampling.py); the bound
# allows 10 times that, so 8 doubts in 64 groups fail a node (p = 2.7e-7), an honest one with chance
# 4e-15 a window.
DOUBT_WINDOW_GROUPS = 64
HONEST_DOUBT_RATE_BOUND = 0.01
NODE_WINDOW_DOUBT = "commitment_node_pooled_doubt"


@dataclass(frozen=True)
class SamplingPolicy:
    """Which submissions get the full check: all of a new node's until it passed
    `num_initial_checks`, then a rate that falls with reputation to `floor_rate`."""

    num_initial_checks: int = 20
    floor_rate: float = 0.05
    max_strikes: int = 2
    probation_tokens: int = PROBATION_TOKENS

    def __post_init__(self) -> None:
        if not 0.0 < self.floor_rate <= 1.0:
            raise ValueError("the validation floor rate must be in (0, 1]: never zero")
        if self.probation_tokens < 0:
            raise ValueError(f"probation_tokens must be >= 0, got {self.probation_tokens}")

    def rate(self, node: NodeRecord) -> float:
        if node.on_probation or node.num_full_checks_passed < self.num_initial_checks or node.num_strikes:
            return 1.0
        return max(self.floor_rate, 1.0 - node.reputation)

    def needs_validation(self, node: NodeRecord | None) -> bool:
        """Drawn from the coordinator's CSPRNG at submission time: a node cannot predict it."""
        if node is None:
            return True
        return secrets.randbelow(1_000_000) < self.rate(node) * 1_000_000


def verdict_to_proto(group_id: str, verdict: Verdict) -> validation_pb2.ValidationVerdict:
    return validation_pb2.ValidationVerdict(
        group_id=group_id,
        passed=verdict.passed,
        check=verdict.check,
        evidence_json=verdict.evidence_json,
        chunks=[
            validation_pb2.ChunkStatistics(
                exponent_mismatches=c.exponent_mismatches,
                mantissa_error_sum=c.mantissa_error_sum,
                num_matched=c.num_matched,
            )
            for c in verdict.chunks
        ],
        tokens=None if verdict.tokens is None else validation_pb2.TokenStatistics(**dataclasses.asdict(verdict.tokens)),
    )


def verdict_from_proto(message: validation_pb2.ValidationVerdict) -> tuple[str, Verdict]:
    """A verdict as a remote validator reports it, with its group id."""
    where = f"the verdict on group {message.group_id!r}"
    try:
        evidence = json.loads(message.evidence_json) if message.evidence_json else {}
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: its evidence is not JSON ({error})") from error
    if not message.group_id or not message.check or not isinstance(evidence, dict):
        raise ValueError(f"{where}: a verdict needs a group id, a check name and a JSON object of evidence")
    if message.chunks and not message.passed:
        raise ValueError(f"{where}: only a passed group's chunks join its node's window")
    if any(not math.isfinite(c.mantissa_error_sum) or c.mantissa_error_sum < 0 for c in message.chunks):
        raise ValueError(f"{where}: a chunk's mantissa error sum must be finite and not negative")
    chunks = tuple(ChunkStats(c.exponent_mismatches, c.mantissa_error_sum, c.num_matched) for c in message.chunks)
    return message.group_id, Verdict(message.passed, message.check, evidence, chunks, _token_stats_from_proto(message))


def _token_stats_from_proto(message: validation_pb2.ValidationVerdict) -> TokenStats | None:
    if not message.HasField("tokens"):
        return None
    where = f"the verdict on group {message.group_id!r}"
    if not message.passed:
        raise ValueError(f"{where}: only a passed group's token statistics join its node's window")
    stats = TokenStats(**{name: getattr(message.tokens, name) for name in TokenStats.__dataclass_fields__})
    if not (
        stats.num_near_ties <= stats.num_tokens
        and stats.num_directed_near_ties <= stats.num_near_ties
        and stats.num_near_ties_up <= stats.num_directed_near_ties
        and stats.num_near_ties_positive <= stats.num_near_ties
    ):
        raise ValueError(
            f"{where}: its token counts do not nest (up <= directed <= near-ties <= tokens, "
            f"positive <= near-ties): {stats}"
        )
    floats = (
        stats.near_ties_positive_expected,
        stats.near_ties_positive_variance,
        stats.logprob_advantage_sum,
        stats.logprob_advantage_sum_squares,
    )
    if not all(map(math.isfinite, floats)) or min(floats[0], floats[1], floats[3]) < 0:
        raise ValueError(
            f"{where}: its token statistics must be finite, the expectation, variance and sum of "
            f"squares not negative: {stats}"
        )
    return stats


def job_to_proto(job: GroupJob) -> validation_pb2.ValidationJob:
    return validation_pb2.ValidationJob(
        group_id=job.group_id,
        node_id=job.node_id,
        policy_version=job.policy_version,
        dtype=job.dtype,
        prompt_token_ids=job.prompt_token_ids,
        sampling=convert.sampling_to_proto(job.sampling),
        seeds=job.seeds,
        group=rollout_pb2.RolloutGroup(rollouts=[convert.rollout_to_proto(r) for r in job.rollouts]),
    )


def job_from_proto(message: validation_pb2.ValidationJob) -> GroupJob:
    if message.dtype not in TOLERANCES:
        raise ValueError(f"validation job {message.group_id}: unknown dtype {message.dtype!r}")
    rollouts = tuple(convert.rollout_from_proto(r) for r in message.group.rollouts)
    if len(message.seeds) != len(rollouts):
        raise ValueError(f"validation job {message.group_id}: {len(message.seeds)} seeds for {len(rollouts)} rollouts")
    return GroupJob(
        message.group_id,
        message.node_id,
        message.policy_version,
        message.dtype,
        tuple(message.prompt_token_ids),
        convert.sampling_from_proto(message.sampling),
        tuple(message.seeds),
        rollouts,
    )


def judge_token_windows(
    store: Store, verdicts: Sequence[tuple[str, Verdict]], window_tokens: int = node_stats.NODE_WINDOW_TOKENS
) -> list[tuple[str, Verdict, bool]]:
    """A passed group's token statistics join its node's token window and lifetime sums; a group
    after which the lifetime sums, or the window once it covers window_tokens tokens, fail a
    node-level test (coordinator/node_stats.py) fails with that test's name. Per group: (group id,
    verdict, whether its node's token window was judged with it and passed)."""
    passed = [
        (group_id, verdict.tokens) for group_id, verdict in verdicts if verdict.passed and verdict.tokens is not None
    ]
    windows = (
        dict(zip([group_id for group_id, _ in passed], store.add_node_tokens(passed, window_tokens), strict=True))
        if passed
        else {}
    )
    judged = []
    for group_id, verdict in verdicts:
        window = windows.get(group_id)
        window_passed = False
        if window is not None:
            node = store.get_node(window.node_id)
            dtype = declared_dtype(node.engine if node is not None else "")
            judgement = node_stats.judge_tokens(window.stats, dtype, window_tokens=window_tokens)
            lifetime_failure = node_stats.judge_lifetime(window.lifetime, dtype)
            window_passed = judgement.passed and lifetime_failure is None
            if judgement.failure is not None:
                verdict = Verdict(
                    False,
                    judgement.failure.check,
                    {
                        **judgement.failure.evidence,
                        "num_groups": window.num_groups,
                        "window": "the node's last fully checked tokens",
                    },
                )
            elif lifetime_failure is not None:
                verdict = Verdict(False, lifetime_failure.check, lifetime_failure.evidence)
        judged.append((group_id, verdict, window_passed))
    return judged


class GroupChecker:
    """The full checks of groups on the trusted model: a validator's whole computation, the same
    inside the coordinator and in a `rollproof validator run` process."""

    def __init__(
        self, history: PolicyHistory, model_dir, tolerances: dict[str, Tolerances] = TOLERANCES, *, device: str = "cpu"
    ):
        from policy.model import check_device

        check_device(device)
        self.history = history
        self.model_dir = model_dir
        self.tolerances = tolerances
        self.device = device
        self._models: dict[str, tuple[Any, int | None]] = {}

    def _model(self, dtype: str, version: int, state: BF16State):
        from policy.model import freeze_long_lived_objects, load_model
        from policy.weights import load_bf16_state

        model, loaded_version = self._models.get(dtype, (None, None))
        if model is None:
            model = load_model(self.model_dir, dtype=dtype, device=self.device)
            freeze_long_lived_objects()
        if loaded_version != version:
            load_bf16_state(model, state)
        self._models[dtype] = (model, version)
        return model

    def check(self, jobs: Sequence[GroupJob]) -> list[Verdict]:
        """One verdict per job. Groups of one version and precision are replayed together: one
        batched prefill over all their rollouts."""
        from policy.prefill import ClaimedRollout, replay

        verdicts: list[Verdict | None] = [None] * len(jobs)
        buckets: dict[tuple[int, str], list[int]] = {}
        for index, job in enumerate(jobs):
            buckets.setdefault((job.policy_version, job.dtype), []).append(index)
        for (version, dtype), indices in sorted(buckets.items()):
            state = self.history.state(version)
            if state is None:
                for index in indices:
                    verdicts[index] = Verdict(False, "version_unavailable", {"policy_version": version})
                continue
            tolerances = self.tolerances[dtype]
            claimed = [
                ClaimedRollout(
                    jobs[i].prompt_token_ids,
                    r.token_ids,
                    r.logprobs,
                    r.commitment,
                    jobs[i].sampling,
                    seed,
                    r.sampled_mask,
                )
                for i in indices
                for r, seed in zip(jobs[i].rollouts, jobs[i].seeds, strict=True)
            ]
            reports = replay(self._model(dtype, version, state), claimed, tolerances.logit_tolerance)
            offset = 0
            for index in indices:
                job_reports = reports[offset : offset + len(jobs[index].rollouts)]
                offset += len(jobs[index].rollouts)
                verdicts[index] = group_verdict(jobs[index], job_reports, tolerances)
        assert all(v is not None for v in verdicts)
        return verdicts  # type: ignore[return-value]


class ValidationQueue:
    """Hands groups waiting for a full check to validators under leases, and applies verdicts.

    A lease is kept in the store (a group's validation_lent_until_ms), so the validators of every
    replica share them, and a group whose validator died is handed out again once its lease runs
    out. A verdict is applied only while its group is still pending, whoever sends it, so a late,
    repeated or concurrent report changes nothing."""

    def __init__(
        self,
        store: Store,
        prompt_of: Callable[[int], LeasedPrompt],
        policy: SamplingPolicy,
        *,
        clock: Callable[[], int],
        lease_ms: int = DEFAULT_VALIDATION_LEASE_MS,
        tolerances: dict[str, Tolerances] = TOLERANCES,
        window_chunks: int = NODE_WINDOW_CHUNKS,
        window_tokens: int = node_stats.NODE_WINDOW_TOKENS,
    ):
        self.store = store
        self.prompt_of = prompt_of
        self.policy = policy
        self.clock = clock
        self.lease_ms = lease_ms
        self.tolerances = tolerances
        self.window_chunks = window_chunks
        self.window_tokens = window_tokens
        self._lock = threading.Lock()  # one report at a time in this process

    def take(self, validator_id: str, max_groups: int) -> tuple[list[GroupJob], int]:
        """Up to max_groups pending groups that no live lease holds, leased to this validator;
        and the lease deadline (ms)."""
        now = self.clock()
        deadline = now + self.lease_ms
        groups = self.store.lend_for_validation(validator_id, max_groups, now, deadline)
        return [self._job(group) for group in groups], deadline

    def _job(self, group: StoredGroup) -> GroupJob:
        lease = self.store.get_lease(group.lease_id)
        assert lease is not None, "a stored group's lease is stored"
        position = lease.prompt_indices.index(group.prompt_index)
        rollouts = convert.group_from_proto(rollout_pb2.RolloutGroup.FromString(group.group_bytes)).rollouts
        node = self.store.get_node(group.node_id)
        return GroupJob(
            group_id=group.group_id,
            node_id=group.node_id,
            policy_version=group.policy_version,
            dtype=declared_dtype(node.engine if node is not None else ""),
            prompt_token_ids=tuple(self.prompt_of(group.prompt_index).prompt_token_ids),
            sampling=lease.sampling,
            seeds=tuple(rule.derive_sample_seed(lease.sampling_seed, position, r.sample_index) for r in rollouts),
            rollouts=rollouts,
        )

    def report(self, verdicts: Sequence[tuple[str, Verdict]]) -> int:
        """Apply (group id, verdict) pairs and all their consequences (strikes, quarantine, bans,
        probation) in one store transaction; returns how many applied (a group that no longer waits
        for a verdict, decided already or quarantined by another failure of its node, is skipped)."""
        with self._lock:
            judged = self._judge_node_windows(self._judge_doubt_rates(verdicts))
            now = self.clock()
            unavailable = [group_id for group_id, verdict, _ in judged if verdict.check == "version_unavailable"]
            still_pending = [
                group_id
                for group_id in unavailable
                if (group := self.store.get_group(group_id)) is not None
                and group.state is GroupState.PENDING_VALIDATION
            ]
            num_applied = self.store.set_group_state(still_pending, GroupState.STALE, now) if still_pending else 0
            results = [
                NewValidation(
                    group_id,
                    verdict.passed,
                    verdict.check,
                    verdict.evidence_json,
                    suspect=verdict.suspect,
                    window_verdict=window_passed,
                )
                for group_id, verdict, window_passed in judged
                if verdict.check != "version_unavailable"
            ]
            outcomes = self.store.record_validations(
                results, now, max_strikes=self.policy.max_strikes, probation_tokens=self.policy.probation_tokens
            )
            for outcome in outcomes:
                if outcome is not None:
                    num_applied += 1
                    self._log(outcome)
            return num_applied

    def _judge_node_windows(self, verdicts: Sequence[tuple[str, Verdict]]) -> list[tuple[str, Verdict, bool]]:
        """A passed group's chunks join its node's window, which is judged once full, and while its
        node is on probation once it holds MIN_WINDOW_CHUNKS chunks: a group that leaves it over the
        pooled bounds fails, or passes in doubt where the evidence is too thin to strike. Per group:
        (group id, verdict, whether node-level verdicts were taken with it, on both its chunk and its token
        window, and passed)."""
        token_judged = judge_token_windows(self.store, verdicts, self.window_tokens)
        passed = [
            (group_id, verdict.chunks) for group_id, verdict, _ in token_judged if verdict.passed and verdict.chunks
        ]
        if not passed:
            return [(group_id, verdict, False) for group_id, verdict, _ in token_judged]
        windows = dict(
            zip(
                [group_id for group_id, _ in passed],
                self.store.add_node_chunks(passed, self.window_chunks),
                strict=True,
            )
        )
        nodes: dict[str, NodeRecord | None] = {}
        judged = []
        for group_id, verdict, tokens_passed in token_judged:
            window = windows.get(group_id)
            window_passed = False
            if window is not None:
                if window.node_id not in nodes:
                    nodes[window.node_id] = self.store.get_node(window.node_id)
                node = nodes[window.node_id]
                on_probation = node is not None and node.on_probation
                if window.num_chunks >= self.window_chunks or (on_probation and window.num_chunks >= MIN_WINDOW_CHUNKS):
                    window_verdict = self._judge_window(window, node)
                    window_passed = window_verdict is None and tokens_passed
                    verdict = window_verdict if window_verdict is not None and verdict.passed else verdict
            judged.append((group_id, verdict, window_passed))
        return judged

    def _judge_doubt_rates(self, verdicts: Sequence[tuple[str, Verdict]]) -> list[tuple[str, Verdict]]:
        """A group's own doubt (`Verdict.suspect`: a check of that group over its bound on too little
        evidence) fails the group once its node's last DOUBT_WINDOW_GROUPS full checks hold more such
        doubts than an honest node's chance allows (node_stats.FALSE_POSITIVE_RATE against
        HONEST_DOUBT_RATE_BOUND): doubts buy more checks of a node, never an unbounded run of them. A
        node window's doubt is not counted: it repeats with every group until the window decides."""
        doubts_now: dict[str, int] = {}
        result = []
        for group_id, verdict in verdicts:
            group = self.store.get_group(group_id) if verdict.suspect else None
            if group is not None:
                doubts_now[group.node_id] = doubts_now.get(group.node_id, 0) + 1
                recent = self.store.list_validations(group.node_id, DOUBT_WINDOW_GROUPS - doubts_now[group.node_id])
                num_doubts = doubts_now[group.node_id] + sum(
                    r.passed and r.check_name not in ("all", NODE_WINDOW_DOUBT) for r in recent
                )
                p_value = node_stats.binomial_upper_tail(num_doubts, DOUBT_WINDOW_GROUPS, HONEST_DOUBT_RATE_BOUND)
                if p_value < node_stats.FALSE_POSITIVE_RATE:
                    verdict = Verdict(
                        False,
                        "node_doubt_rate",
                        {
                            "doubt": verdict.check,
                            "num_doubts": num_doubts,
                            "num_groups": DOUBT_WINDOW_GROUPS,
                            "allowed_rate": HONEST_DOUBT_RATE_BOUND,
                            "p_value": p_value,
                            "false_positive_rate": node_stats.FALSE_POSITIVE_RATE,
                        },
                    )
            result.append((group_id, verdict))
        return result

    def _judge_window(self, window: ChunkWindow, node: NodeRecord | None) -> Verdict | None:
        """None when the window passes; else a failure, or a doubting pass on too little evidence: a
        window short of full (a probation verdict) may release a node's groups, but it fails a node
        only once full, where honest windows were measured (MIN_WINDOW_CHUNKS)."""
        thresholds = self.tolerances[declared_dtype(node.engine if node is not None else "")].thresholds
        pooled = commitment.PooledCheck.from_sums(
            window.num_chunks, window.exponent_mismatches, window.mantissa_error_sum, window.num_matched
        )
        verdict = pooled_verdict(
            "commitment_node_pooled", pooled, thresholds, {"window": "the node's last fully checked chunks"}
        )
        if verdict is not None and not verdict.passed and window.num_chunks < self.window_chunks:
            return dataclasses.replace(verdict, passed=True, check=NODE_WINDOW_DOUBT)
        return verdict

    def _log(self, outcome: ValidationOutcome) -> None:
        result, node = outcome.result, outcome.node
        if not result.passed:
            log.warning(
                "node %s failed the %s check (%s); %s, %d groups quarantined, %d credits voided, %d of its groups "
                "consumed by the trainer before%s",
                node.node_id,
                result.check_name,
                result.evidence_json,
                f"strike {node.num_strikes}" if outcome.struck else "no new strike (its submission failed before)",
                outcome.num_quarantined,
                outcome.num_voided,
                result.num_groups_consumed,
                "; banned" if outcome.banned_now else "",
            )
        elif result.check_name != "all":
            log.warning(
                "node %s is in doubt after the %s check (%s): on probation, every submission checked",
                node.node_id,
                result.check_name,
                result.evidence_json,
            )
        if outcome.probation_ended is not None:
            log.info(
                "node %s passed probation after %d checked tokens: %d held groups are ready",
                node.node_id,
                node.num_checked_tokens - node.probation_start_tokens,
                outcome.probation_ended,
            )


class Validator:
    """The validator inside the coordinator: takes work from the queue like any other."""

    VALIDATOR_ID = "in-process"

    def __init__(self, queue: ValidationQueue, checker: GroupChecker):
        self.queue = queue
        self.checker = checker

    def run_pending(self, limit: int = 64) -> int:
        """Check up to `limit` pending groups; returns how many were taken."""
        jobs, _ = self.queue.take(self.VALIDATOR_ID, limit)
        if jobs:
            self.queue.report(
                [(job.group_id, verdict) for job, verdict in zip(jobs, self.checker.check(jobs), strict=True)]
            )
        return len(jobs)
