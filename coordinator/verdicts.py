"""The verdict on one fully checked group, from the validator's replay of its rollouts.

Per rollout, in order (`check_rollout`): each token against the seeded sampling rule (near-ties
tolerated up to a bound), the reported log-probabilities within a drift, the activation commitment
per chunk, and termination; then the commitment statistics pooled over the group (`group_verdict`).
The first failure is the verdict. A statistical check over too little evidence to strike passes the
group in doubt (`Verdict.suspect`): its node goes on probation, checked more, instead of a strike.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator import node_stats
from coordinator.store import ChunkStats, TokenStats
from protocol import commitment
from protocol import sampling as rule
from protocol.types import FinishReason, Rollout, SamplingParams

# A `stop` must end in an EOS that the seeded rule chose. Where the rule chose another token and the
# EOS stands only as a tolerated near-tie, the policy must also give the EOS at least this probability
# (log 1e-4). An EOS the rule itself chose needs no floor: at T = 1 an honest node samples an EOS of
# probability p at a rate p, and over a run's millions of tokens that happens (seen: an honest fp32
# node banned for an EOS of probability 4.4e-5 that the rule had picked).
MIN_EOS_LOGPROB = math.log(1e-4)
# Tolerated near-ties per rollout: positions where the claimed token is not the validator's argmax
# but within the logit tolerance of it (and doubted tokens, tolerated_ties). A backstop only: steady
# near-tie abuse is judged per node over its window (coordinator/node_stats.py), which per-rollout
# bounds that honest bf16 drift must pass cannot see. The budget is the count an honest rollout of its
# length exceeds with probability at most NEAR_TIE_FALSE_POSITIVE_RATE, each token a near-tie at its
# precision's node_stats.NEAR_TIE_RATE_BOUND (1.5% in bf16, twice the measured honest 0-0.7%; 0.1% in
# fp32, which measured none) (max_near_ties): in bf16 3 of 5 tokens, 6 of 32, 16 of 256, 37 of 1,024;
# in fp32 2 of 5, 3 of 32, 9 of 1,024 (issue 16: a budget of 10% of the tokens, at least 4, allowed 4
# of a 5-token completion and 103 of 1,024, and honest bf16 rollouts at 0.7% exceeded it with
# probability up to 9e-6).
NEAR_TIE_FALSE_POSITIVE_RATE = 1e-6
# No strike on thin evidence (issue 16): honest bf16 drift across attention kernels now and then puts
# a claimed token's score just past the tolerance, or its log-probability just past the drift bound.
# A rollout whose only sampling failure is at most this many mismatches, each within
# protocol.sampling.DOUBT_GAP_FACTOR times the tolerance or just outside the filter band
# (TokenVerdict.FILTER_DOUBT), passes in doubt (`sampling_doubt`); so does one whose only drift
# failure is at most max_doubted_drift_tokens(its length) tokens, each within
# Tolerances.drift_doubt_factor times the bound (`logprob_drift_doubt`). The node goes on probation:
# every submission checked and its groups held until its windows pass. A doubted token counts as a
# near-tie in its node's statistics (node_stats: rate, direction and temperature tests; directed drift
# is node_logprob_direction's), and a node doubted far more often than honest nodes fails on its doubt
# rate (coordinator/validation.py, DOUBT_WINDOW_GROUPS). Measured: protocol/sampling.py.
MAX_DOUBTED_MISMATCHES = 1
# Honest bf16 log-probabilities over the drift bound come in clusters: the default model's
# ill-conditioned end-of-sequence logit moves the last tokens of a rollout together. Measured (2-core
# EPYC, bench/validation.py, ~443,000 tokens per engine, ~78,000 rollouts of 5.7 tokens on average): 1
# rollout of the vLLM node held two such tokens, where independent tokens at the marginal rate (about
# 2.3e-5 a token) predict 6e-4 such rollouts. A binomial per token at HONEST_DRIFT_DOUBT_RATE predicts
# one pair in 78,000 rollouts of 6 tokens (15 r^2 = 1.5e-5), so the tokens a rollout may hold in doubt
# are the count an honest one exceeds with probability at most DRIFT_DOUBT_FALSE_POSITIVE_RATE at that
# rate (max_doubted_drift_tokens): 1 for 1-2 tokens, 2 for 3-19, 3 for 20-72, 4 for 73-170, 9 at 1,000.
HONEST_DRIFT_DOUBT_RATE = 1e-3
DRIFT_DOUBT_FALSE_POSITIVE_RATE = 1e-6


@dataclass(frozen=True)
class Tolerances:
    """What a validator forgives, by the precision a node declares (its engine string): the
    protocol's measured presets (protocol/commitment.py, protocol/sampling.py)."""

    thresholds: commitment.Thresholds
    max_logprob_drift: float
    logit_tolerance: float
    near_tie_rate: float  # the honest near-tie rate a rollout's near-tie budget assumes
    drift_doubt_factor: float = 1.0

    @classmethod
    def for_dtype(cls, dtype: str) -> Tolerances:
        replay = rule.tolerances_for(dtype)
        return cls(
            commitment.thresholds_for(dtype),
            replay.max_logprob_drift,
            replay.logit_tolerance,
            node_stats.NEAR_TIE_RATE_BOUND[dtype],
            replay.drift_doubt_factor,
        )


TOLERANCES = {dtype: Tolerances.for_dtype(dtype) for dtype in ("float32", "bfloat16")}


def declared_dtype(engine: str) -> str:
    return "bfloat16" if "bfloat16" in engine or "bf16" in engine else "float32"


@dataclass(frozen=True)
class Verdict:
    passed: bool
    check: str  # the first failed check, or "all"
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
    return ChunkStats(
        check.exponent_mismatches, check.mantissa_error_mean * num_matched if num_matched else 0.0, num_matched
    )


def _positions(mask: np.ndarray, limit: int = 16) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)[:limit]]


def check_rollout(report, rollout, tolerances: Tolerances) -> Verdict:
    """The full checks of one replayed rollout, in order; the first failure is the verdict, else the
    first doubt (sampling, drift, commitment), else a pass."""
    logit_tolerance = tolerances.logit_tolerance
    checks = report.token_checks
    num_tokens = sum(rollout.sampled_mask)  # environment tokens are not checked
    base = {"sample_index": rollout.sample_index, "num_tokens": num_tokens}
    if report.commitment_error is not None:
        return Verdict(False, "commitment", {**base, "error": report.commitment_error})
    sampling_doubt = sampling_verdict(checks, report.temperature, logit_tolerance, base)
    if sampling_doubt is not None and not sampling_doubt.passed:
        return sampling_doubt
    near_ties = tolerated_ties(checks, report.temperature, logit_tolerance)
    allowed_near_ties = max_near_ties(num_tokens, tolerances.near_tie_rate)
    if near_ties.sum() > allowed_near_ties:
        return Verdict(
            False,
            "near_ties",
            {
                **base,
                "num_near_ties": int(near_ties.sum()),
                "allowed": allowed_near_ties,
                "positions": _positions(near_ties),
            },
        )
    drift = report.logprob_drift
    allowed_drift = report.allowed_logprob_drift(tolerances.max_logprob_drift)
    drift_doubt = drift_verdict(drift, allowed_drift, tolerances.drift_doubt_factor, base)
    if drift_doubt is not None and not drift_doubt.passed:
        return drift_doubt
    commitment_doubt = chunk_verdict(report.commitment_checks, tolerances.thresholds, base)
    if commitment_doubt is not None and not commitment_doubt.passed:
        return commitment_doubt
    if rollout.finish_reason == FinishReason.STOP and near_ties[-1] and checks.logprobs[-1] < MIN_EOS_LOGPROB:
        return Verdict(
            False,
            "termination",
            {
                **base,
                "eos_logprob": float(checks.logprobs[-1]),
                "allowed_min": MIN_EOS_LOGPROB,
                "eos_verdict": "near_tie",
            },
        )
    return (
        sampling_doubt
        or drift_doubt
        or commitment_doubt
        or Verdict(
            True,
            "all",
            {**base, "num_near_ties": int(near_ties.sum()), "max_logprob_drift": float(drift.max(initial=0.0))},
        )
    )


def max_doubted_drift_tokens(num_tokens: int) -> int:
    """The most tokens of a rollout of num_tokens whose drift over the bound may be doubted: the
    smallest count k >= 1 that a Binomial(num_tokens, HONEST_DRIFT_DOUBT_RATE) exceeds with probability
    at most DRIFT_DOUBT_FALSE_POSITIVE_RATE."""
    return node_stats.binomial_allowance(num_tokens, HONEST_DRIFT_DOUBT_RATE, DRIFT_DOUBT_FALSE_POSITIVE_RATE)


def max_near_ties(num_tokens: int, near_tie_rate: float) -> int:
    """The near-ties (doubted tokens included) a rollout of num_tokens may hold: the count an honest
    rollout exceeds with probability at most NEAR_TIE_FALSE_POSITIVE_RATE when each token is a near-tie
    at near_tie_rate (the declared precision's node_stats.NEAR_TIE_RATE_BOUND)."""
    return node_stats.binomial_allowance(num_tokens, near_tie_rate, NEAR_TIE_FALSE_POSITIVE_RATE)


def drift_verdict(drift: np.ndarray, allowed: float, doubt_factor: float, base: dict[str, Any]) -> Verdict | None:
    """None when every token's log-probability drift is within `allowed`; a doubt when at most
    max_doubted_drift_tokens(len(drift)) tokens are over it, each by at most doubt_factor times (honest
    bf16 drift across kernels, Tolerances); else a failure."""
    over = drift > allowed
    if not over.any():
        return None
    max_drift = float(drift.max())
    max_doubted = max_doubted_drift_tokens(len(drift))
    in_doubt = int(over.sum()) <= max_doubted and max_drift <= doubt_factor * allowed
    return Verdict(
        in_doubt,
        "logprob_drift_doubt" if in_doubt else "logprob_drift",
        {
            **base,
            "max_drift": max_drift,
            "allowed": allowed,
            "positions": _positions(over),
            "doubt_drift": doubt_factor * allowed,
            "max_doubted_tokens": max_doubted,
        },
    )


def chunk_verdict(
    chunk_checks: Sequence[commitment.ChunkCheck], thresholds: commitment.Thresholds, base: dict[str, Any]
) -> Verdict | None:
    """None when every chunk is within its bounds; else the first failing chunk's failure, or a doubt."""
    failing = [(i, c) for i, c in enumerate(chunk_checks) if not c.passes(thresholds)]
    # A chunk that committed every value it holds is scored on its smallest values too: over its
    # bounds by last-bit noise alone it is doubt (more checks of the node), not a strike
    # (commitment.ChunkCheck.complete); a garbage one is a strike however short.
    decisive = [(i, c) for i, c in failing if not c.within_last_bit_noise()]
    if not failing:
        return None
    index, chunk = (decisive or failing)[0]
    return Verdict(
        not decisive,
        "commitment" if decisive else "commitment_short_chunk_doubt",
        {
            **base,
            "chunk": index,
            "num_failing_chunks": len(failing),
            "exponent_mismatches": chunk.exponent_mismatches,
            "mantissa_error_mean": chunk.mantissa_error_mean,
            "mantissa_error_median": chunk.mantissa_error_median,
            "allowed": dict(
                zip(
                    ("exponent_mismatches", "mantissa_error_mean", "mantissa_error_median"),
                    chunk.bounds(thresholds),
                    strict=True,
                )
            ),
            "bound_scale": chunk.bound_scale,
        },
    )


def sampling_verdict(
    checks: rule.TokenChecks, temperature: float, logit_tolerance: float, base: dict[str, Any]
) -> Verdict | None:
    """None when no token is a mismatch; a doubt when the mismatches are few and close enough to the
    tolerance for honest drift (protocol.sampling.DOUBT_GAP_FACTOR); else a failure."""
    mismatched = checks.mismatched
    if not mismatched.any():
        return None
    tolerance = rule.score_tolerance(logit_tolerance, temperature)
    doubted = rule.doubted_mismatches(checks, tolerance)
    num_mismatches = int(mismatched.sum())
    in_doubt = num_mismatches <= MAX_DOUBTED_MISMATCHES and bool(doubted[mismatched].all())
    return Verdict(
        in_doubt,
        "sampling_doubt" if in_doubt else "sampling",
        {
            **base,
            "positions": _positions(mismatched),
            "num_mismatches": num_mismatches,
            "max_score_gap": float(checks.score_gaps[mismatched].max()),
            "allowed_score_gap": float(tolerance),
            "doubt_score_gap": float(np.float32(rule.DOUBT_GAP_FACTOR) * tolerance),
            "max_doubted_mismatches": MAX_DOUBTED_MISMATCHES,
        },
    )


def tolerated_ties(checks: rule.TokenChecks, temperature: float, logit_tolerance: float) -> np.ndarray:
    """Per token: a near-tie, or a mismatch passed in doubt (sampling_verdict). Both are choices a
    node could steer, so both count against the per-rollout budget and in the node's statistics."""
    return np.asarray(
        (checks.verdicts == rule.TokenVerdict.NEAR_TIE)
        | rule.doubted_mismatches(checks, rule.score_tolerance(logit_tolerance, temperature))
    )


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


def pooled_verdict(
    check: str, pooled: commitment.PooledCheck, thresholds: commitment.Thresholds, evidence: dict[str, Any]
) -> Verdict | None:
    """None when the pool is within its bounds; a failure of `check` over them on enough evidence;
    over them on too little (commitment.PooledCheck.judge), a pass in doubt: `check`_doubt."""
    judgement = pooled.judge(thresholds)
    if judgement is commitment.PoolVerdict.PASS:
        return None
    failed = judgement is commitment.PoolVerdict.FAIL
    return Verdict(
        not failed,
        check if failed else f"{check}_doubt",
        {
            **evidence,
            "num_chunks": pooled.num_chunks,
            "exponent_mismatches_per_chunk": pooled.exponent_mismatches_per_chunk,
            "mantissa_error_mean": pooled.mantissa_error_mean,
            "allowed": {
                "exponent_mismatches_per_chunk": thresholds.max_pooled_exponent_mismatches,
                "mantissa_error_mean": thresholds.max_pooled_mantissa_error_mean,
            },
            "honest_exponent_mismatches_per_chunk": thresholds.honest_exponent_mismatches,
            "max_false_positive_rate": thresholds.max_false_positive_rate,
        },
    )


def group_verdict(job: GroupJob, reports, tolerances: Tolerances) -> Verdict:
    """Every rollout's checks in order, then the commitment statistics pooled over the group. A
    doubt (a rollout's or the pool's) passes the group in doubt; a complete chunk over its bounds,
    the doubt of its rollout, is left out of the pools."""
    chunk_checks = []
    doubt = None
    for report, rollout in zip(reports, job.rollouts, strict=True):
        verdict = check_rollout(report, rollout, tolerances)
        if not verdict.passed:
            return verdict
        doubt = doubt or (verdict if verdict.suspect else None)
        chunk_checks.extend(c for c in report.commitment_checks if not c.complete or c.passes(tolerances.thresholds))
    pooled = commitment.pool(chunk_checks)
    pooled_doubt = pooled_verdict("commitment_pooled", pooled, tolerances.thresholds, {"dtype": job.dtype})
    if pooled_doubt is not None and not pooled_doubt.passed:
        return pooled_doubt
    doubt = pooled_doubt or doubt
    tokens = node_stats.group_token_stats(
        [
            node_stats.RolloutTokens(
                tolerated_ties(report.token_checks, report.temperature, tolerances.logit_tolerance),
                report.near_tie_lifts,
                report.token_checks.score_gaps / rule.score_tolerance(tolerances.logit_tolerance, report.temperature),
                report.logprob_offsets,
                report.temperature,
                rollout.claimed_reward,
            )
            for report, rollout in zip(reports, job.rollouts, strict=True)
        ]
    )
    if doubt is not None:  # its chunks still join the node's window, which settles the doubt
        return dataclasses.replace(doubt, chunks=tuple(map(chunk_stats, chunk_checks)), tokens=tokens)
    return Verdict(
        True,
        "all",
        {"num_rollouts": len(job.rollouts), "num_chunks": pooled.num_chunks, "dtype": job.dtype},
        tuple(map(chunk_stats, chunk_checks)),
        tokens,
    )
