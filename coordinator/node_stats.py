"""Node-level statistics of fully checked tokens: what per-rollout bounds cannot see.

A bf16 node's tokens are replayed under tolerances that must pass honest drift between engines, so a
node may take a near-tie (a token within the tolerance of the validator's choice) at will, shade its
log-probabilities within the drift bound, or sample at a slightly wrong temperature or with an unasked
filter, and every single rollout still passes. Each such deviation is small and *directed*; honest
drift is neither frequent nor directed. So the validator reports, per passed group, a few sums
(records.TokenStats, built by `group_token_stats`); the coordinator pools a node's newest groups
covering NODE_WINDOW_TOKENS tokens across validators and restarts (the store's node token windows),
and `judge_tokens` tests the window:

* node_near_tie_rate: more near-ties than an honest engine of the declared precision takes (exact
  binomial tail against NEAR_TIE_RATE_BOUND).
* node_near_tie_direction: near-ties concentrated in rollouts of positive advantage (reward above the
  group's mean, from rewards the coordinator recomputed): steering toward reward. Under honest drift
  a near-tie falls on any token of the group's rollouts of nonzero advantage alike; Bernstein's bound
  on the excess over that expectation.
* node_logprob_direction: claimed - recomputed log-probabilities correlated with the advantage (the
  trainer's importance-ratio denominators shaded toward reward): sum over rollouts of advantage times
  the rollout's median offset (in logit units), self-normalised; two-sided Hoeffding bound (advantages
  sum to zero in a group, so a constant offset of an engine cancels).
* node_temperature_fit: near-ties taken at T > 0 through a choice among them. Honest drift flips a
  token only where two scores all but tie (most honest near-ties lie within a tenth of the tolerance),
  and then toward either token alike; a node sampling at another temperature, or with a top-k/top-p
  the lease did not ask for, takes near-ties at any score gap up to the tolerance, and always toward
  the likelier token (colder, filtered) or always the less likely one (hotter). So it counts the
  *wide* near-ties (score gap over WIDE_GAP_FRACTION of the tolerance; greedy ones and those between
  equal logits have no direction) that took the likelier token, and those that took the less likely
  one, each held to an exact binomial tail at half of WIDE_NEAR_TIE_RATE_BOUND (honest wide near-ties
  lean neither way), two-sided (twice the smaller tail). A sign test over all near-ties tops out at
  2^(1 - n) for n near-ties all one way: an unasked top-p 0.95 leaves ~20 in a window of 4,096 tokens,
  so p ~ 1e-6 (issue 16, 16.4), where ~13 wide ones all the likelier way against an honest 1.6 expected
  are p ~ 4e-8.
* node_near_ties_combined: the near-tie rate, direction and sign tests' p-values pooled by Fisher's
  method (chi-square, 6 degrees of freedom). A node steering its near-ties leaves some evidence in
  each (too many, in rollouts of positive advantage, toward one side) and, over one window, often not
  enough in any one: near-ties steered toward the answer (issue 16, measured on the default model, 402
  windows of 4,096 tokens, with a sign test over all near-ties) passed all three in 36% of windows
  (rate test p up to 6.5e-3, direction never below 1.6e-5, sign test up to 4.3e-3) and failed the
  combination in every window (p at most 2.8e-7). That steerer took near-ties at any gap, so
  node_temperature_fit now catches it first; the combination is what a steerer keeping to narrow gaps
  (no wide near-ties) still meets, and over one window that is too little to catch one whose excess
  is a few tokens: the lifetime tests below catch that one. It is valid because p_rate is a function of the
  near-tie count alone, and given the near-ties the direction test (which rollouts hold them) and the
  sign test (the wide ones' lifts' signs) are valid p-values, independent of each other under honest
  drift, whose near-ties fall on any token alike and lean neither way.

Each test fails at most at FALSE_POSITIVE_RATE per window it judges when its null hypothesis holds;
the bounds are checked against simulation in tests/unit/test_node_stats.py and the honest rates were
measured by bench/validation.py. A window with fewer than NODE_WINDOW_TOKENS tokens decides nothing.

The lifetime tests (`judge_lifetime`, after every group on the sums of every group the node passed)
carry the near-tie rate, direction and temperature-fit tests across windows as e-processes, valid
however often they are looked at, so a deviation too small for any window accumulates until caught.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.store import TokenStats

# Tokens a node's window covers before it is judged: its newest fully checked groups that sum to at
# least this many. A new node's groups are trainable only after its first judged window (probation).
NODE_WINDOW_TOKENS = 4096
# Per test and judged window, for an honest node. Windows are judged after every group, overlapping,
# so over a node's life the chance of a false strike grows with (its tokens / the window) times this.
FALSE_POSITIVE_RATE = 1e-6
# The near-tie rate the binomial test holds a node to, per declared precision: above every honest
# rate measured (bench/validation.py, see NEAR_TIE_RATE_MEASURED), with room for engines not measured.
NEAR_TIE_RATE_BOUND = {"float32": 1e-3, "bfloat16": 0.015}
NEAR_TIE_RATE_MEASURED = {"float32": 0.0, "bfloat16": 0.007}
# A near-tie is wide when its score gap is over this fraction of the tolerance, and the rate of wide
# directed near-ties an honest node is held to (node_temperature_fit), half of it each way. Measured
# (bench/validation.py's engines and configurations, score gaps in units of the tolerance): of 244
# honest vLLM bf16 near-ties in 74,544 tokens, 11 wide (1.5e-4 a token; 2.4e-4 in the worst
# configuration; 4 of them the likelier way); in 172,808 more, 20 of 472 (1.2e-4; 3.8e-4 in the worst
# configuration, T = 1 against the eager validator: 11 in 28,801, 6 the likelier way); of 287 torch
# bf16 near-ties across attention kernels (~84,000 tokens), 5 (6e-5). The bound is twice the worst
# configuration's rate, as NEAR_TIE_RATE_BOUND is, for engines not measured. The steered and filtered
# near-ties of issue 16 spread evenly over the gaps up to the tolerance: two thirds of them are wide.
WIDE_GAP_FRACTION = 0.3
WIDE_NEAR_TIE_RATE_BOUND = {"float32": 1e-4, "bfloat16": 8e-4}

# The lifetime tests (`judge_lifetime`) watch the sums of every group a node ever passed, after every
# group, for deviations too small for one window (a steerer keeping to narrow gaps shifts about 4
# near-ties of 4,096 tokens into rollouts of positive advantage). Each is an e-process: a mixture of
# likelihood ratios that stays a nonnegative supermartingale under its null, so by Ville's inequality
# the chance that their mean ever reaches 1 / LIFETIME_FALSE_POSITIVE_RATE over a node's whole life
# is at most that rate, however many groups it is judged after. Their nulls keep slack for
# systematic honest effects, which a window hides and a lifetime accumulates: the rate tests hold a
# node to the window tests' bounds (twice the worst honest rate measured); the direction test allows
# an excess of DIRECTION_SLACK x its variance (honest nodes measured: bench/validation.py).
LIFETIME_FALSE_POSITIVE_RATE = 1e-6
RATE_MULTIPLES = tuple(1.1 * 1.6**k for k in range(10))  # alternatives: rate x 1.1 .. x 75
DIRECTION_LAMBDAS = tuple(0.03 * 1.5**k for k in range(11))  # 0.03 .. 1.73
DIRECTION_SLACK = 0.1

WINDOW_CHECKS = (
    "node_near_tie_rate",
    "node_near_tie_direction",
    "node_logprob_direction",
    "node_temperature_fit",
    "node_near_ties_combined",
)
LIFETIME_CHECKS = (
    "node_lifetime_near_tie_rate",
    "node_lifetime_near_tie_direction",
    "node_lifetime_temperature_fit",
)
CHECKS = WINDOW_CHECKS + LIFETIME_CHECKS


@dataclass(frozen=True)
class RolloutTokens:
    """One replayed rollout, as the statistics need it."""

    near_ties: np.ndarray  # bool per token
    near_tie_lifts: np.ndarray  # per token: claimed logit - the validator's choice's, at near-ties
    score_gaps: np.ndarray  # per token: how far the claim scored below the validator's best, / the tolerance
    logprob_offsets: np.ndarray  # per token: claimed - recomputed log-probability
    temperature: float
    reward: float  # recomputed by the coordinator (the cheap checks reject a claim that differs)


def group_token_stats(rollouts: Sequence[RolloutTokens]) -> TokenStats:
    """The sums one group adds to its node's window."""
    if not rollouts:
        return TokenStats()
    rewards = np.array([r.reward for r in rollouts], dtype=np.float64)
    advantages = rewards - rewards.mean()
    num_tokens = [len(r.near_ties) for r in rollouts]
    num_near_ties = [int(r.near_ties.sum()) for r in rollouts]
    directed = [
        r.near_ties & (r.near_tie_lifts != 0) & (r.score_gaps > WIDE_GAP_FRACTION)
        if r.temperature > 0
        else np.zeros_like(r.near_ties)
        for r in rollouts
    ]
    positive, negative = advantages > 0, advantages < 0
    tokens_positive = sum(n for n, p in zip(num_tokens, positive, strict=True) if p)
    tokens_signed = tokens_positive + sum(n for n, m in zip(num_tokens, negative, strict=True) if m)
    near_ties_signed = sum(n for n, a in zip(num_near_ties, advantages, strict=True) if a != 0)
    share = tokens_positive / tokens_signed if tokens_signed else 0.0
    # The median offset of a rollout, not the mean: honest bf16 engines disagree on single
    # ill-conditioned logits (the default model's end-of-sequence token: up to 1.3 apart, and
    # whether a rollout ends in it follows its reward), which moves the mean of a short rollout
    # but not its median; shading that steers the trainer's ratios moves most tokens.
    weighted = [
        a * (r.temperature or 1.0) * float(np.median(r.logprob_offsets)) if len(r.logprob_offsets) else 0.0
        for a, r in zip(advantages, rollouts, strict=True)
    ]
    return TokenStats(
        num_tokens=sum(num_tokens),
        num_near_ties=sum(num_near_ties),
        num_directed_near_ties=sum(int(d.sum()) for d in directed),
        num_near_ties_up=sum(int((r.near_tie_lifts[d] > 0).sum()) for r, d in zip(rollouts, directed, strict=True)),
        num_near_ties_positive=sum(n for n, p in zip(num_near_ties, positive, strict=True) if p),
        near_ties_positive_expected=near_ties_signed * share,
        near_ties_positive_variance=near_ties_signed * share * (1.0 - share),
        logprob_advantage_sum=float(sum(weighted)),
        logprob_advantage_sum_squares=float(sum(w * w for w in weighted)),
    )


def binomial_upper_tail(successes: int, trials: int, probability: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, probability)."""
    if successes <= 0:
        return 1.0
    if successes > trials or probability <= 0.0:
        return 0.0
    if probability >= 1.0:
        return 1.0
    log_p, log_q = math.log(probability), math.log1p(-probability)
    log_terms: list[float] = []
    top = -math.inf
    for k in range(successes, trials + 1):
        log_term = (
            math.lgamma(trials + 1)
            - math.lgamma(k + 1)
            - math.lgamma(trials - k + 1)
            + k * log_p
            + (trials - k) * log_q
        )
        log_terms.append(log_term)
        top = max(top, log_term)
        # Past the mode the terms fall ever faster: stop once the rest cannot count (below 1e-17 of
        # the sum however many are left).
        if k > trials * probability and log_term < top - 40 - math.log(trials):
            break
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


@functools.cache
def binomial_allowance(num_trials: int, rate: float, false_positive_rate: float) -> int:
    """The fewest events of num_trials that may be allowed, at least 1: the smallest count k >= 1 that
    a Binomial(num_trials, rate) exceeds with probability at most false_positive_rate (num_trials
    where no smaller count does)."""
    allowed = 1
    while (
        allowed < num_trials
        # (a relative 1e-9 for the float sum's rounding, which would otherwise decide exact ties)
        and binomial_upper_tail(allowed + 1, num_trials, rate) > false_positive_rate * (1 + 1e-9)
    ):
        allowed += 1
    return allowed


def sign_test(num_up: int, num_directed: int) -> float:
    """Two-sided p-value of num_up of num_directed signs being positive, each with probability 1/2."""
    if num_directed == 0:
        return 1.0
    return min(1.0, 2.0 * binomial_upper_tail(max(num_up, num_directed - num_up), num_directed, 0.5))


def one_way_count_test(num_up: int, num_down: int, trials: int, rate_each_way: float) -> float:
    """Two-sided p-value of num_up events one way and num_down the other in `trials`, each way at most
    rate_each_way a trial: twice the smaller binomial upper tail."""
    return min(
        1.0,
        2.0
        * min(binomial_upper_tail(num_up, trials, rate_each_way), binomial_upper_tail(num_down, trials, rate_each_way)),
    )


def bernstein_upper_bound(excess: float, variance: float) -> float:
    """Bound on P(X - E[X] >= excess) for a sum X of independent Bernoulli variables with this total
    variance (Bernstein: exp(-t^2 / (2 (v + t / 3))))."""
    if excess <= 0.0:
        return 1.0
    return math.exp(-excess * excess / (2.0 * (variance + excess / 3.0)))


def self_normalized_bound(total: float, sum_squares: float) -> float:
    """Two-sided bound on P(|sum of x_i| >= |total|) for independent x_i of symmetric sign given their
    magnitudes, where sum_squares = sum of x_i^2 (Hoeffding: 2 exp(-total^2 / (2 sum_squares)))."""
    if sum_squares <= 0.0:
        return 1.0
    return min(1.0, 2.0 * math.exp(-total * total / (2.0 * sum_squares)))


def fisher_combined(p_values: Sequence[float]) -> float:
    """Fisher's combination of k p-values: P(chi-square with 2k degrees of freedom >= -2 sum log p),
    in closed form exp(-h) sum_{i<k} h^i / i! with h = -sum log p. A valid p-value when each input is,
    given the ones before it (conditionally super-uniform)."""
    if not p_values:
        return 1.0
    half = -sum(math.log(max(p, sys.float_info.min)) for p in p_values)
    return min(1.0, math.exp(-half) * sum(half**i / math.factorial(i) for i in range(len(p_values))))


def _log_mean_exp(log_values: Sequence[float]) -> float:
    top = max(log_values)
    return top + math.log(sum(math.exp(v - top) for v in log_values) / len(log_values))


def binomial_log_e_value(count: int, trials: int, rate: float) -> float:
    """log of an e-value against "each trial an event at most at `rate`": the mean over rate multiples
    m of the likelihood ratio m^count ((1 - rate + rate m) / 1)^-trials of Binomial(trials, m rate)
    against Binomial(trials, rate). Computed from running counts it is a nonnegative supermartingale
    under that null, so it exceeds 1 / alpha at any time of a node's life with probability at most
    alpha (Ville's inequality), however often it is looked at."""
    return _log_mean_exp([count * math.log(m) - trials * math.log1p(rate * (m - 1.0)) for m in RATE_MULTIPLES])


def bennett_log_e_value(excess: float, variance: float, slack: float) -> float:
    """log of an e-value against "a sum of independent indicators, each at most 1 above its mean, is
    at most slack x its variance above its expectation": the mean over lambda of
    exp(lambda (excess - slack variance) - (e^lambda - 1 - lambda) variance) (Bennett's bound on each
    indicator's moment generating function), a supermartingale in running sums under that null."""
    return _log_mean_exp(
        [lam * (excess - slack * variance) - (math.expm1(lam) - lam) * variance for lam in DIRECTION_LAMBDAS]
    )


@dataclass(frozen=True)
class NodeTestFailure:
    check: str  # one of CHECKS
    evidence: dict[str, Any]


@dataclass(frozen=True)
class TokenJudgement:
    """A node's window of fully checked tokens, judged: decided once it holds window_tokens tokens."""

    num_tokens: int
    decided: bool
    failure: NodeTestFailure | None

    @property
    def passed(self) -> bool:
        return self.decided and self.failure is None


def _check_dtype(dtype: str) -> None:
    if dtype not in NEAR_TIE_RATE_BOUND:
        raise ValueError(f"no honest near-tie rate for dtype {dtype!r}: expected one of {sorted(NEAR_TIE_RATE_BOUND)}")


def lifetime_log_e_values(stats: TokenStats, dtype: str) -> dict[str, float]:
    """Per lifetime test, the log of its e-value on a node's lifetime sums (the temperature fit's is
    the mean of its two one-way tests')."""
    _check_dtype(dtype)
    wide_each_way = WIDE_NEAR_TIE_RATE_BOUND[dtype] / 2
    num_wide_down = stats.num_directed_near_ties - stats.num_near_ties_up
    return {
        "node_lifetime_near_tie_rate": binomial_log_e_value(
            stats.num_near_ties, stats.num_tokens, NEAR_TIE_RATE_BOUND[dtype]
        ),
        "node_lifetime_near_tie_direction": bennett_log_e_value(
            stats.num_near_ties_positive - stats.near_ties_positive_expected,
            stats.near_ties_positive_variance,
            DIRECTION_SLACK,
        ),
        "node_lifetime_temperature_fit": _log_mean_exp(
            [
                binomial_log_e_value(stats.num_near_ties_up, stats.num_tokens, wide_each_way),
                binomial_log_e_value(num_wide_down, stats.num_tokens, wide_each_way),
            ]
        ),
    }


def judge_lifetime(
    stats: TokenStats, dtype: str, *, false_positive_rate: float = LIFETIME_FALSE_POSITIVE_RATE
) -> NodeTestFailure | None:
    """The lifetime tests on the sums of every group a node passed: a failure once the mean of their
    e-values reaches 1 / false_positive_rate, named after the test whose e-value is largest."""
    log_e_values = lifetime_log_e_values(stats, dtype)
    log_e_value = _log_mean_exp(list(log_e_values.values()))
    if log_e_value < -math.log(false_positive_rate):
        return None
    return NodeTestFailure(
        max(log_e_values, key=log_e_values.__getitem__),
        {
            "num_tokens": stats.num_tokens,
            "false_positive_rate": false_positive_rate,
            "dtype": dtype,
            "window": "every token the node had fully checked",
            "p_value": math.exp(-log_e_value),
            "log10_e_values": {check: value / math.log(10) for check, value in log_e_values.items()},
            "num_near_ties": stats.num_near_ties,
            "num_near_ties_positive": stats.num_near_ties_positive,
            "expected": stats.near_ties_positive_expected,
            "variance": stats.near_ties_positive_variance,
            "num_wide_near_ties_up": stats.num_near_ties_up,
            "num_wide_near_ties_down": stats.num_directed_near_ties - stats.num_near_ties_up,
        },
    )


def judge_tokens(
    stats: TokenStats,
    dtype: str,
    *,
    window_tokens: int = NODE_WINDOW_TOKENS,
    false_positive_rate: float = FALSE_POSITIVE_RATE,
) -> TokenJudgement:
    """The five window tests of the module docstring on a node's pooled statistics, in order; the
    first failure is the judgement's. `dtype` is the precision the node declared."""
    _check_dtype(dtype)
    if stats.num_tokens < window_tokens:
        return TokenJudgement(stats.num_tokens, False, None)
    base = {"num_tokens": stats.num_tokens, "false_positive_rate": false_positive_rate, "dtype": dtype}
    rate_bound, wide_bound = NEAR_TIE_RATE_BOUND[dtype], WIDE_NEAR_TIE_RATE_BOUND[dtype]
    p_rate = binomial_upper_tail(stats.num_near_ties, stats.num_tokens, rate_bound)
    p_direction = bernstein_upper_bound(
        stats.num_near_ties_positive - stats.near_ties_positive_expected, stats.near_ties_positive_variance
    )
    num_wide_down = stats.num_directed_near_ties - stats.num_near_ties_up
    p_fit = one_way_count_test(stats.num_near_ties_up, num_wide_down, stats.num_tokens, wide_bound / 2)
    p_sign = sign_test(stats.num_near_ties_up, stats.num_directed_near_ties)
    all_tests = (
        (
            "node_near_tie_rate",
            p_rate,
            {
                "num_near_ties": stats.num_near_ties,
                "near_tie_rate": stats.num_near_ties / stats.num_tokens,
                "allowed_rate": rate_bound,
            },
        ),
        (
            "node_near_tie_direction",
            p_direction,
            {
                "num_near_ties_positive": stats.num_near_ties_positive,
                "expected": stats.near_ties_positive_expected,
                "variance": stats.near_ties_positive_variance,
            },
        ),
        (
            "node_logprob_direction",
            self_normalized_bound(stats.logprob_advantage_sum, stats.logprob_advantage_sum_squares),
            {
                "logprob_advantage_sum": stats.logprob_advantage_sum,
                "z": stats.logprob_advantage_sum / math.sqrt(stats.logprob_advantage_sum_squares)
                if stats.logprob_advantage_sum_squares > 0
                else 0.0,
            },
        ),
        (
            "node_temperature_fit",
            p_fit,
            {
                "num_wide_near_ties_up": stats.num_near_ties_up,
                "num_wide_near_ties_down": num_wide_down,
                "allowed_rate_each_way": wide_bound / 2,
            },
        ),
        ("node_near_ties_combined", fisher_combined([p_rate, p_direction, p_sign]), {}),
    )
    for check, p_value, evidence in all_tests:
        if p_value < false_positive_rate:
            p_values = {c: p for c, p, _ in all_tests}  # every test's, for the margins
            return TokenJudgement(
                stats.num_tokens,
                True,
                NodeTestFailure(check, {**base, **evidence, "p_value": p_value, "p_values": p_values}),
            )
    return TokenJudgement(stats.num_tokens, True, None)
