"""Full re-verification of sampled submissions, and what a failure costs the node.

For a group of a sampled submission the validator rebuilds the policy at the version the
group claims (from the same signed updates the nodes apply), prefills prompt + completion
once, and checks every rollout: each token against the seeded sampling rule (near-ties
tolerated up to a bound), the reported log-probabilities within a drift, the activation
commitment per chunk and pooled over the group, and termination. The prompt is the
coordinator's, never the node's.

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
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from coordinator import node_stats
from coordinator.blobstore import NoUpdatePathError
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
from protocol import commitment, convert
from protocol import sampling as rule
from protocol.codec import BF16State
from protocol.manifest import apply_update, open_update, verify_manifest
from protocol.proto import rollout_pb2, validation_pb2
from protocol.types import FinishReason, LeasedPrompt, Rollout, SamplingParams, SignedManifest

log = logging.getLogger(__name__)

# A `stop` must end in an EOS that the seeded rule chose. Where the rule chose another token and the
# EOS stands only as a tolerated near-tie, the policy must also give the EOS at least this probability
# (log 1e-4). An EOS the rule itself chose needs no floor: at T = 1 an honest node samples an EOS of
# probability p at a rate p, and over a run's millions of tokens that happens (seen: an honest fp32
# node banned for an EOS of probability 4.4e-5 that the rule had picked).
MIN_EOS_LOGPROB = math.log(1e-4)
# Tolerated near-ties per rollout: positions where the claimed token is not the validator's argmax
# but within the logit tolerance of it. Honest bf16 runs show ~0.7% of tokens (at the bf16 tolerance),
# so two in a 32-token rollout happen (seen in CI: a bound of 1 banned an honest node). A near-tie gives
# a cheater no real choice, so the bound only has to stop wholesale abuse: 10% of tokens, at least 4
# (an honest 32-token rollout exceeds 4 with probability ~3e-6). A backstop only: steady near-tie
# abuse is judged per node over its window (coordinator/node_stats.py). Measured honest bf16 rates are
# 0-0.5% (torch node vs torch validator, SDPA or eager: bench/validation.py); at 0.7% the worst rollout
# length exceeds this bound with probability 9e-6, and a tighter 8% would raise it to 2.7e-5 (at 40
# and 50 tokens) for strikes on honest nodes over millions of rollouts, so it stays.
MAX_NEAR_TIE_FRACTION = 0.10
MIN_NEAR_TIES_ALLOWED = 4
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


@dataclass(frozen=True)
class Tolerances:
    """What a validator forgives, by the precision a node declares (its engine string): the
    protocol's measured presets (protocol/commitment.py, protocol/sampling.py)."""

    thresholds: commitment.Thresholds
    max_logprob_drift: float
    logit_tolerance: float

    @classmethod
    def for_dtype(cls, dtype: str) -> Tolerances:
        replay = rule.tolerances_for(dtype)
        return cls(commitment.thresholds_for(dtype), replay.max_logprob_drift, replay.logit_tolerance)


TOLERANCES = {dtype: Tolerances.for_dtype(dtype) for dtype in ("float32", "bfloat16")}


def declared_dtype(engine: str) -> str:
    return "bfloat16" if "bfloat16" in engine or "bf16" in engine else "float32"


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


@dataclass(frozen=True)
class Verdict:
    passed: bool
    check: str                 # the first failed check, or "all"
    evidence: dict[str, Any]
    chunks: tuple[ChunkStats, ...] = field(default=(), repr=False)  # a passed group's, for its node's window
    tokens: TokenStats | None = field(default=None, repr=False)  # a passed group's, for its node's token window

    @property
    def evidence_json(self) -> str:
        return json.dumps(self.evidence, sort_keys=True)

    @property
    def suspect(self) -> bool:
        """Passed, but doubted by a statistical check over too little evidence to strike (check names
        it): the node is checked more, on probation, instead."""
        return self.passed and self.check != "all"


def chunk_stats(check: commitment.ChunkCheck) -> ChunkStats:
    num_matched = check.num_points - check.exponent_mismatches
    return ChunkStats(check.exponent_mismatches, check.mantissa_error_mean * num_matched if num_matched else 0.0,
                      num_matched)


def verdict_to_proto(group_id: str, verdict: Verdict) -> validation_pb2.ValidationVerdict:
    return validation_pb2.ValidationVerdict(
        group_id=group_id, passed=verdict.passed, check=verdict.check, evidence_json=verdict.evidence_json,
        chunks=[validation_pb2.ChunkStatistics(exponent_mismatches=c.exponent_mismatches,
                                               mantissa_error_sum=c.mantissa_error_sum, num_matched=c.num_matched)
                for c in verdict.chunks],
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
    if not (stats.num_near_ties <= stats.num_tokens and stats.num_directed_near_ties <= stats.num_near_ties
            and stats.num_near_ties_up <= stats.num_directed_near_ties
            and stats.num_near_ties_positive <= stats.num_near_ties):
        raise ValueError(f"{where}: its token counts do not nest (up <= directed <= near-ties <= tokens, "
                         f"positive <= near-ties): {stats}")
    floats = (stats.near_ties_positive_expected, stats.near_ties_positive_variance, stats.logprob_advantage_sum,
              stats.logprob_advantage_sum_squares)
    if not all(map(math.isfinite, floats)) or min(floats[0], floats[1], floats[3]) < 0:
        raise ValueError(f"{where}: its token statistics must be finite, the expectation, variance and sum of "
                         f"squares not negative: {stats}")
    return stats


class PolicySource(Protocol):
    """Where signed updates come from: the coordinator's blob store, or the coordinator over gRPC."""

    def update_path(self, from_version: int | None) -> list[SignedManifest]:
        """Raises NoUpdatePathError when there is nothing to apply."""
        ...

    def read_blob(self, blob_hash: bytes) -> bytes: ...


class PolicyHistory:
    """bf16 states of the last `num_versions` policy versions, rebuilt by applying the same signed
    updates a node applies (checked against the trainer's key)."""

    def __init__(self, blobs: PolicySource, run_id: str, trainer_public_key: bytes, num_versions: int):
        self.blobs = blobs
        self.run_id = run_id
        self.trainer_public_key = trainer_public_key
        self.num_versions = num_versions
        self._tip: BF16State | None = None
        self._tip_version: int | None = None
        self._states: OrderedDict[int, BF16State] = OrderedDict()

    def advance(self) -> None:
        try:
            path = self.blobs.update_path(self._tip_version)
        except NoUpdatePathError:
            return
        for signed in path:
            manifest = verify_manifest(signed, self.trainer_public_key)
            opened = open_update(
                signed,
                {ref.hash: self.blobs.read_blob(ref.hash) for ref in manifest.blobs},
                trainer_public_key=self.trainer_public_key,
                run_id=self.run_id,
                current_version=self._tip_version,
                current_specs=None,
            )
            base = None if opened.keyframe_state is not None else self._tip
            new_state = apply_update(base, opened)
            self._tip = new_state
            self._tip_version = opened.manifest.version
            self._states[opened.manifest.version] = {name: bits.copy() for name, bits in new_state.items()}
            while len(self._states) > self.num_versions:
                self._states.popitem(last=False)

    def state(self, version: int) -> BF16State | None:
        if version not in self._states:
            self.advance()
        return self._states.get(version)


def _positions(mask: np.ndarray, limit: int = 16) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)[:limit]]


def check_rollout(report, rollout, *, logit_tolerance: float, max_logprob_drift: float,
                  thresholds: commitment.Thresholds) -> Verdict:
    """The full checks of one replayed rollout, in order; the first failure is the verdict."""
    checks = report.token_checks
    num_tokens = len(rollout.token_ids)
    base = {"sample_index": rollout.sample_index, "num_tokens": num_tokens}
    if report.commitment_error is not None:
        return Verdict(False, "commitment", {**base, "error": report.commitment_error})
    mismatched = checks.verdicts == rule.TokenVerdict.MISMATCH
    if mismatched.any():
        return Verdict(False, "sampling", {
            **base, "positions": _positions(mismatched), "num_mismatches": int(mismatched.sum()),
            "max_score_gap": float(checks.score_gaps[mismatched].max()), "allowed_score_gap": logit_tolerance,
        })
    max_near_ties = max(MIN_NEAR_TIES_ALLOWED, math.ceil(MAX_NEAR_TIE_FRACTION * num_tokens))
    if checks.num_near_ties > max_near_ties:
        return Verdict(False, "near_ties", {
            **base, "num_near_ties": checks.num_near_ties, "allowed": max_near_ties,
            "positions": _positions(checks.verdicts == rule.TokenVerdict.NEAR_TIE),
        })
    drift = report.logprob_drift
    allowed_drift = report.allowed_logprob_drift(max_logprob_drift)
    if drift.max(initial=0.0) > allowed_drift:
        return Verdict(False, "logprob_drift", {
            **base, "max_drift": float(drift.max()), "allowed": allowed_drift,
            "positions": _positions(drift > allowed_drift),
        })
    failing = [(i, c) for i, c in enumerate(report.commitment_checks) if not c.passes(thresholds)]
    # A chunk that committed every value it holds is scored on its smallest values too: over its
    # bounds alone it is doubt (more checks of the node), not a strike (commitment.ChunkCheck.complete).
    decisive = [(i, c) for i, c in failing if not c.complete]
    doubt = None
    if failing:
        index, chunk = (decisive or failing)[0]
        doubt = Verdict(not decisive, "commitment" if decisive else "commitment_short_chunk_doubt", {
            **base, "chunk": index, "num_failing_chunks": len(failing),
            "exponent_mismatches": chunk.exponent_mismatches, "mantissa_error_mean": chunk.mantissa_error_mean,
            "mantissa_error_median": chunk.mantissa_error_median,
            "allowed": {"exponent_mismatches": thresholds.max_exponent_mismatches,
                        "mantissa_error_mean": thresholds.max_mantissa_error_mean,
                        "mantissa_error_median": thresholds.max_mantissa_error_median},
        })
        if decisive:
            return doubt
    if (rollout.finish_reason == FinishReason.STOP and checks.verdicts[-1] == rule.TokenVerdict.NEAR_TIE
            and checks.logprobs[-1] < MIN_EOS_LOGPROB):
        return Verdict(False, "termination", {
            **base, "eos_logprob": float(checks.logprobs[-1]), "allowed_min": MIN_EOS_LOGPROB,
            "eos_verdict": "near_tie",
        })
    return doubt or Verdict(True, "all", {**base, "num_near_ties": checks.num_near_ties,
                                          "max_logprob_drift": float(drift.max(initial=0.0))})


@dataclass(frozen=True)
class GroupJob:
    """Everything a validator needs to fully check one stored group, assembled by the coordinator:
    the prompt, sampling parameters and seeds come from its lease, never from the node."""

    group_id: str
    node_id: str
    policy_version: int
    dtype: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    seeds: tuple[int, ...]  # one per rollout, in order
    rollouts: tuple[Rollout, ...]


def job_to_proto(job: GroupJob) -> validation_pb2.ValidationJob:
    return validation_pb2.ValidationJob(
        group_id=job.group_id, node_id=job.node_id, policy_version=job.policy_version, dtype=job.dtype,
        prompt_token_ids=job.prompt_token_ids, sampling=convert.sampling_to_proto(job.sampling), seeds=job.seeds,
        group=rollout_pb2.RolloutGroup(rollouts=[convert.rollout_to_proto(r) for r in job.rollouts]),
    )


def job_from_proto(message: validation_pb2.ValidationJob) -> GroupJob:
    if message.dtype not in TOLERANCES:
        raise ValueError(f"validation job {message.group_id}: unknown dtype {message.dtype!r}")
    rollouts = tuple(convert.rollout_from_proto(r) for r in message.group.rollouts)
    if len(message.seeds) != len(rollouts):
        raise ValueError(f"validation job {message.group_id}: {len(message.seeds)} seeds for {len(rollouts)} rollouts")
    return GroupJob(message.group_id, message.node_id, message.policy_version, message.dtype,
                    tuple(message.prompt_token_ids), convert.sampling_from_proto(message.sampling),
                    tuple(message.seeds), rollouts)


def pooled_verdict(check: str, pooled: commitment.PooledCheck, thresholds: commitment.Thresholds,
                   evidence: dict[str, Any]) -> Verdict | None:
    """None when the pool is within its bounds; a failure of `check` over them on enough evidence;
    over them on too little (commitment.PooledCheck.judge), a pass in doubt: `check`_doubt."""
    judgement = pooled.judge(thresholds)
    if judgement is commitment.PoolVerdict.PASS:
        return None
    failed = judgement is commitment.PoolVerdict.FAIL
    return Verdict(not failed, check if failed else f"{check}_doubt", {
        **evidence, "num_chunks": pooled.num_chunks,
        "exponent_mismatches_per_chunk": pooled.exponent_mismatches_per_chunk,
        "mantissa_error_mean": pooled.mantissa_error_mean,
        "allowed": {"exponent_mismatches_per_chunk": thresholds.max_pooled_exponent_mismatches,
                    "mantissa_error_mean": thresholds.max_pooled_mantissa_error_mean},
        "honest_exponent_mismatches_per_chunk": thresholds.honest_exponent_mismatches,
        "max_false_positive_rate": thresholds.max_false_positive_rate,
    })


def judge_token_windows(store: Store, verdicts: Sequence[tuple[str, Verdict]],
                        window_tokens: int = node_stats.NODE_WINDOW_TOKENS) -> list[tuple[str, Verdict, bool]]:
    """A passed group's token statistics join its node's token window; once the window covers
    window_tokens tokens, a group that leaves it failing a node-level test (coordinator/node_stats.py)
    fails with that test's name. Per group: (group id, verdict, whether its node's token window was
    judged with it and passed)."""
    passed = [(group_id, verdict.tokens) for group_id, verdict in verdicts
              if verdict.passed and verdict.tokens is not None]
    windows = dict(zip([group_id for group_id, _ in passed], store.add_node_tokens(passed, window_tokens))) \
        if passed else {}
    judged = []
    for group_id, verdict in verdicts:
        window = windows.get(group_id)
        window_passed = False
        if window is not None:
            node = store.get_node(window.node_id)
            judgement = node_stats.judge_tokens(window.stats, declared_dtype(node.engine if node is not None else ""),
                                                window_tokens=window_tokens)
            window_passed = judgement.passed
            if judgement.failure is not None:
                verdict = Verdict(False, judgement.failure.check, {
                    **judgement.failure.evidence, "num_groups": window.num_groups,
                    "window": "the node's last fully checked tokens"})
        judged.append((group_id, verdict, window_passed))
    return judged


class GroupChecker:
    """The full checks of groups on the trusted model: a validator's whole computation, the same
    inside the coordinator and in a `rollproof validator run` process."""

    def __init__(self, history: PolicyHistory, model_dir, tolerances: dict[str, Tolerances] = TOLERANCES, *,
                 device: str = "cpu"):
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
            claimed = [ClaimedRollout(jobs[i].prompt_token_ids, r.token_ids, r.logprobs, r.commitment,
                                      jobs[i].sampling, seed)
                       for i in indices for r, seed in zip(jobs[i].rollouts, jobs[i].seeds)]
            reports = replay(self._model(dtype, version, state), claimed, tolerances.logit_tolerance)
            offset = 0
            for index in indices:
                job_reports = reports[offset:offset + len(jobs[index].rollouts)]
                offset += len(jobs[index].rollouts)
                verdicts[index] = group_verdict(jobs[index], job_reports, tolerances)
        assert all(v is not None for v in verdicts)
        return verdicts  # type: ignore[return-value]


def group_verdict(job: GroupJob, reports, tolerances: Tolerances) -> Verdict:
    """Every rollout's checks in order, then the commitment statistics pooled over the group. A
    doubt (a rollout's or the pool's) passes the group in doubt; a complete chunk over its bounds,
    the doubt of its rollout, is left out of the pools."""
    chunk_checks = []
    doubt = None
    for report, rollout in zip(reports, job.rollouts):
        verdict = check_rollout(
            report, rollout, logit_tolerance=tolerances.logit_tolerance,
            max_logprob_drift=tolerances.max_logprob_drift, thresholds=tolerances.thresholds,
        )
        if not verdict.passed:
            return verdict
        doubt = doubt or (verdict if verdict.suspect else None)
        chunk_checks.extend(c for c in report.commitment_checks if not c.complete or c.passes(tolerances.thresholds))
    pooled = commitment.pool(chunk_checks)
    pooled_doubt = pooled_verdict("commitment_pooled", pooled, tolerances.thresholds, {"dtype": job.dtype})
    if pooled_doubt is not None and not pooled_doubt.passed:
        return pooled_doubt
    doubt = pooled_doubt or doubt
    tokens = node_stats.group_token_stats([
        node_stats.RolloutTokens(report.token_checks.verdicts == rule.TokenVerdict.NEAR_TIE, report.near_tie_lifts,
                                 report.logprob_offsets, report.temperature, rollout.claimed_reward)
        for report, rollout in zip(reports, job.rollouts)])
    if doubt is not None:  # its chunks still join the node's window, which settles the doubt
        return dataclasses.replace(doubt, chunks=tuple(map(chunk_stats, chunk_checks)), tokens=tokens)
    return Verdict(True, "all", {"num_rollouts": len(job.rollouts), "num_chunks": pooled.num_chunks,
                                 "dtype": job.dtype}, tuple(map(chunk_stats, chunk_checks)), tokens)


class ValidationQueue:
    """Hands groups waiting for a full check to validators under leases, and applies verdicts.

    A lease lives in memory only: the store's group state is the durable part, so a group whose
    validator died (or that was leased before a coordinator restart) is handed out again once its
    lease runs out. A verdict is applied only while its group is still pending, whoever sends it,
    so a late, repeated or concurrent report changes nothing."""

    def __init__(self, store: Store, prompt_of: Callable[[int], LeasedPrompt], policy: SamplingPolicy, *,
                 clock: Callable[[], int], lease_ms: int = DEFAULT_VALIDATION_LEASE_MS,
                 tolerances: dict[str, Tolerances] = TOLERANCES, window_chunks: int = NODE_WINDOW_CHUNKS,
                 window_tokens: int = node_stats.NODE_WINDOW_TOKENS):
        self.store = store
        self.prompt_of = prompt_of
        self.policy = policy
        self.clock = clock
        self.lease_ms = lease_ms
        self.tolerances = tolerances
        self.window_chunks = window_chunks
        self.window_tokens = window_tokens
        self._leases: dict[str, tuple[str, int]] = {}  # group id -> (validator id, deadline ms)
        self._lock = threading.Lock()

    def take(self, validator_id: str, max_groups: int) -> tuple[list[GroupJob], int]:
        """Up to max_groups pending groups that no live lease holds, leased to this validator;
        and the lease deadline (ms)."""
        with self._lock:
            now = self.clock()
            self._leases = {g: lease for g, lease in self._leases.items() if lease[1] > now}
            deadline = now + self.lease_ms
            groups = [g for g in self.store.pending_validation(max_groups + len(self._leases))
                      if g.group_id not in self._leases][:max_groups]
            for group in groups:
                self._leases[group.group_id] = (validator_id, deadline)
        return [self._job(group) for group in groups], deadline

    def _job(self, group: StoredGroup) -> GroupJob:
        lease = self.store.get_lease(group.lease_id)
        assert lease is not None, "a stored group's lease is stored"
        position = lease.prompt_indices.index(group.prompt_index)
        rollouts = convert.group_from_proto(rollout_pb2.RolloutGroup.FromString(group.group_bytes)).rollouts
        node = self.store.get_node(group.node_id)
        return GroupJob(
            group_id=group.group_id, node_id=group.node_id, policy_version=group.policy_version,
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
            for group_id, _ in verdicts:
                self._leases.pop(group_id, None)
            judged = self._judge_node_windows(verdicts)
            now = self.clock()
            unavailable = [group_id for group_id, verdict, _ in judged if verdict.check == "version_unavailable"]
            still_pending = [group_id for group_id in unavailable
                             if (group := self.store.get_group(group_id)) is not None
                             and group.state is GroupState.PENDING_VALIDATION]
            num_applied = self.store.set_group_state(still_pending, GroupState.STALE, now) if still_pending else 0
            results = [NewValidation(group_id, verdict.passed, verdict.check, verdict.evidence_json,
                                     suspect=verdict.suspect, window_verdict=window_passed)
                       for group_id, verdict, window_passed in judged if verdict.check != "version_unavailable"]
            outcomes = self.store.record_validations(results, now, max_strikes=self.policy.max_strikes,
                                                     probation_tokens=self.policy.probation_tokens)
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
        passed = [(group_id, verdict.chunks) for group_id, verdict, _ in token_judged
                  if verdict.passed and verdict.chunks]
        if not passed:
            return [(group_id, verdict, False) for group_id, verdict, _ in token_judged]
        windows = dict(zip([group_id for group_id, _ in passed],
                           self.store.add_node_chunks(passed, self.window_chunks)))
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

    def _judge_window(self, window: ChunkWindow, node: NodeRecord | None) -> Verdict | None:
        """None when the window passes; else a failure, or a doubting pass on too little evidence: a
        window short of full (a probation verdict) may release a node's groups, but it fails a node
        only once full, where honest windows were measured (MIN_WINDOW_CHUNKS)."""
        thresholds = self.tolerances[declared_dtype(node.engine if node is not None else "")].thresholds
        pooled = commitment.PooledCheck.from_sums(window.num_chunks, window.exponent_mismatches,
                                                  window.mantissa_error_sum, window.num_matched)
        verdict = pooled_verdict("commitment_node_pooled", pooled, thresholds,
                                 {"window": "the node's last fully checked chunks"})
        if verdict is not None and not verdict.passed and window.num_chunks < self.window_chunks:
            return dataclasses.replace(verdict, passed=True, check=f"{verdict.check}_doubt")
        return verdict

    def _log(self, outcome: ValidationOutcome) -> None:
        result, node = outcome.result, outcome.node
        if not result.passed:
            log.warning(
                "node %s failed the %s check (%s); %s, %d groups quarantined, %d credits voided, %d of its groups "
                "consumed by the trainer before%s", node.node_id, result.check_name, result.evidence_json,
                f"strike {node.num_strikes}" if outcome.struck else "no new strike (its submission failed before)",
                outcome.num_quarantined, outcome.num_voided, result.num_groups_consumed,
                "; banned" if outcome.banned_now else "",
            )
        elif result.check_name != "all":
            log.warning("node %s is in doubt after the %s check (%s): on probation, every submission checked",
                        node.node_id, result.check_name, result.evidence_json)
        if outcome.probation_ended is not None:
            log.info("node %s passed probation after %d checked tokens: %d held groups are ready",
                     node.node_id, node.num_checked_tokens - node.probation_start_tokens, outcome.probation_ended)


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
            self.queue.report([(job.group_id, verdict) for job, verdict in zip(jobs, self.checker.check(jobs))])
        return len(jobs)
