"""Full re-verification of sampled submissions, and what a failure costs the node.

For a group of a sampled submission the validator rebuilds the policy at the version the
group claims (from the same signed updates the nodes apply), prefills prompt + completion
once, and checks every rollout: each token against the seeded sampling rule (near-ties
tolerated up to a bound), the reported log-probabilities within a drift, the activation
commitment per chunk and pooled over the group, and termination. The prompt is the
coordinator's, never the node's.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.blobstore import BlobStore, NoUpdatePathError
from coordinator.store import GroupState, NodeRecord, Store, StoredGroup
from protocol import commitment, convert
from protocol import sampling as rule
from protocol.codec import BF16State
from protocol.manifest import apply_update, open_update, verify_manifest
from protocol.proto import rollout_pb2
from protocol.types import FinishReason, LeasedPrompt

log = logging.getLogger(__name__)

# A `stop` must end in an EOS the policy gives at least this probability (log 1e-4).
MIN_EOS_LOGPROB = math.log(1e-4)
# Tolerated near-ties per rollout: positions where the claimed token is not the validator's argmax
# but within the logit tolerance of it. Honest bf16 runs show ~0.7% of tokens (at the bf16 tolerance),
# so two in a 32-token rollout happen (seen in CI: a bound of 1 banned an honest node). A near-tie gives
# a cheater no real choice, so the bound only has to stop wholesale abuse: 10% of tokens, at least 4
# (an honest 32-token rollout exceeds 4 with probability ~3e-6).
MAX_NEAR_TIE_FRACTION = 0.10
MIN_NEAR_TIES_ALLOWED = 4


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

    def __post_init__(self) -> None:
        if not 0.0 < self.floor_rate <= 1.0:
            raise ValueError("the validation floor rate must be in (0, 1]: never zero")

    def rate(self, node: NodeRecord) -> float:
        if node.num_full_checks_passed < self.num_initial_checks or node.num_strikes:
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

    @property
    def evidence_json(self) -> str:
        return json.dumps(self.evidence, sort_keys=True)


class PolicyHistory:
    """bf16 states of the last `num_versions` policy versions, rebuilt from the blob store by
    applying the same signed updates a node applies."""

    def __init__(self, blobs: BlobStore, run_id: str, trainer_public_key: bytes, num_versions: int):
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
    if drift.max(initial=0.0) > max_logprob_drift:
        return Verdict(False, "logprob_drift", {
            **base, "max_drift": float(drift.max()), "allowed": max_logprob_drift,
            "positions": _positions(drift > max_logprob_drift),
        })
    failing = [(i, c) for i, c in enumerate(report.commitment_checks) if not c.passes(thresholds)]
    if failing:
        index, chunk = failing[0]
        return Verdict(False, "commitment", {
            **base, "chunk": index, "num_failing_chunks": len(failing),
            "exponent_mismatches": chunk.exponent_mismatches, "mantissa_error_mean": chunk.mantissa_error_mean,
            "mantissa_error_median": chunk.mantissa_error_median,
            "allowed": {"exponent_mismatches": thresholds.max_exponent_mismatches,
                        "mantissa_error_mean": thresholds.max_mantissa_error_mean,
                        "mantissa_error_median": thresholds.max_mantissa_error_median},
        })
    if rollout.finish_reason == FinishReason.STOP and checks.logprobs[-1] < MIN_EOS_LOGPROB:
        return Verdict(False, "termination", {
            **base, "eos_logprob": float(checks.logprobs[-1]), "allowed_min": MIN_EOS_LOGPROB,
        })
    return Verdict(True, "all", {**base, "num_near_ties": checks.num_near_ties,
                                 "max_logprob_drift": float(drift.max(initial=0.0))})


class Validator:
    """Runs the full checks on pending groups and applies the consequences."""

    def __init__(
        self,
        store: Store,
        history: PolicyHistory,
        model_dir,
        prompt_of,
        policy: SamplingPolicy,
        *,
        clock,
        tolerances: dict[str, Tolerances] = TOLERANCES,
    ):
        self.store = store
        self.history = history
        self.model_dir = model_dir
        self.prompt_of = prompt_of
        self.policy = policy
        self.clock = clock
        self.tolerances = tolerances
        self._models: dict[str, tuple[Any, int | None]] = {}

    def _model(self, dtype: str, version: int, state: BF16State):
        from policy.model import load_model
        from policy.weights import load_bf16_state

        model, loaded_version = self._models.get(dtype, (None, None))
        if model is None:
            model = load_model(self.model_dir, dtype=dtype)
        if loaded_version != version:
            load_bf16_state(model, state)
        self._models[dtype] = (model, version)
        return model

    def validate(self, group: StoredGroup, engine: str) -> Verdict:
        from policy.prefill import ClaimedRollout, replay

        state = self.history.state(group.policy_version)
        if state is None:
            return Verdict(False, "version_unavailable", {"policy_version": group.policy_version})
        lease = self.store.get_lease(group.lease_id)
        prompt: LeasedPrompt = self.prompt_of(group.prompt_index)
        position = lease.prompt_indices.index(group.prompt_index)
        rollouts = convert.group_from_proto(rollout_pb2.RolloutGroup.FromString(group.group_bytes)).rollouts
        dtype = declared_dtype(engine)
        tolerances = self.tolerances[dtype]
        model = self._model(dtype, group.policy_version, state)
        claimed = [
            ClaimedRollout(
                prompt_token_ids=prompt.prompt_token_ids,
                token_ids=r.token_ids,
                logprobs=r.logprobs,
                commitment=r.commitment,
                sampling=lease.sampling,
                seed=rule.derive_sample_seed(lease.sampling_seed, position, r.sample_index),
            )
            for r in rollouts
        ]
        try:
            reports = replay(model, claimed, tolerances.logit_tolerance)
        except commitment.CommitmentError as error:
            return Verdict(False, "commitment", {"error": str(error)})
        chunk_checks = []
        for report, rollout in zip(reports, rollouts):
            verdict = check_rollout(
                report, rollout, logit_tolerance=tolerances.logit_tolerance,
                max_logprob_drift=tolerances.max_logprob_drift, thresholds=tolerances.thresholds,
            )
            if not verdict.passed:
                return verdict
            chunk_checks.extend(report.commitment_checks)
        pooled = commitment.pool(chunk_checks)
        if not pooled.passes(tolerances.thresholds):
            return Verdict(False, "commitment_pooled", {
                "num_chunks": pooled.num_chunks,
                "exponent_mismatches_per_chunk": pooled.exponent_mismatches_per_chunk,
                "mantissa_error_mean": pooled.mantissa_error_mean,
                "allowed": {"exponent_mismatches_per_chunk": tolerances.thresholds.max_pooled_exponent_mismatches,
                            "mantissa_error_mean": tolerances.thresholds.max_pooled_mantissa_error_mean},
            })
        return Verdict(True, "all", {"num_rollouts": len(rollouts), "num_chunks": pooled.num_chunks, "dtype": dtype})

    def run_pending(self, limit: int = 64) -> int:
        """Validate up to `limit` pending groups; returns how many were decided."""
        groups = self.store.pending_validation(limit)
        for group in groups:
            current = self.store.get_group(group.group_id)
            if current is None or current.state is not GroupState.PENDING_VALIDATION:
                continue  # quarantined by a failure of another group of its node: one strike per failure
            engine = self._engine_of(group)
            verdict = self.validate(group, engine)
            now = self.clock()
            if verdict.check == "version_unavailable":
                self.store.set_group_state([group.group_id], GroupState.STALE, now)
                continue
            self.store.record_validation(group.group_id, verdict.passed, verdict.check, verdict.evidence_json, now)
            node = self.store.record_full_check(group.node_id, verdict.passed)
            if verdict.passed:
                continue
            num_quarantined = self.store.quarantine_node_groups(group.node_id, now)
            num_voided = self.store.void_unsettled(group.node_id)
            log.warning(
                "node %s failed the %s check (%s); %d groups quarantined, %d credits voided, strike %d",
                group.node_id, verdict.check, verdict.evidence_json, num_quarantined, num_voided, node.num_strikes,
            )
            if node.num_strikes >= self.policy.max_strikes and not node.banned:
                self.store.ban_node(group.node_id, f"failed {node.num_strikes} full checks; last: {verdict.check}")
        return len(groups)

    def _engine_of(self, group: StoredGroup) -> str:
        node = self.store.get_node(group.node_id)
        return node.engine if node is not None else ""
