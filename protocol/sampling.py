"""The seeded sampling rule, numpy reference (see DESIGN.md, "Seeded sampling rule").

Token t of a completion is

    argmax_i ( z_t[i] + g(seed, t, i) )   over the allowed set,   z_t = logits_t * float32(1 / T)

where g is Gumbel noise made from a counter-based hash of (seed, position, token id). Because the
noise depends on nothing but those three integers, a node and a validator produce the same noise
on any device and in any batch; the completion is a function of the model and the seed.

Exact definitions (both the numpy reference here and policy/sampling.py follow them):

* Hash. 32-bit words held in wider integers; every multiply has a factor below 2**31, so products
  stay below 2**63 and no implementation ever wraps a signed integer. `mix32` is a two-round
  xorshift-multiply bijection of 32-bit words. Per row (seed, position):
  key0 = mix32(mix32(mix32(seed_lo ^ SEED_DOMAIN) ^ seed_hi) ^ position),
  key1 = mix32(key0 ^ TOKEN_DOMAIN); per token id i: bits = mix32(mix32(i ^ key1) ^ key0).
* Noise. k = bits >> 8 (24 bits); u = (2k + 1) / 2**25 in float64 (exact, strictly inside (0, 1));
  g = float32(-log(-log(u))) computed in float64 and rounded once to float32. g takes only 2**24
  values, so implementations are compared on all of them (tests/unit/test_sampling_torch.py).
* Temperature. T > 0 scales by a float32 multiply with the float32-rounded reciprocal (a float32
  multiply is exactly rounded everywhere; division by a scalar is not always done as a division).
  T = 0 is greedy: argmax of the raw logits, no noise, no filter.
* Filters define a threshold on the scaled logits z; the allowed set is {i : z[i] >= threshold},
  so tokens tied with the boundary value are all kept. top_k = 0 and top_p = 1 disable them.
  top_k: threshold_k = k-th largest z. top_p: over z sorted descending with the top-k survivors
  only, p = softmax (float32), the first index j where cumsum(p)[j] >= top_p (the last survivor if
  rounding keeps the sum below top_p); threshold_p = sorted z[j]. threshold = max of the two.
* Ties in the perturbed score go to the lowest token id (first maximum).
* Log-probability under the sampling distribution: log_softmax over the allowed set of z, at the
  sampled token (float32). At T = 0 it is log_softmax of the raw, unfiltered logits.
* Margin: best perturbed score minus the second best (+inf when one token is allowed). At T = 0,
  best logit minus the second best logit.

A validator's logits differ from a node's by a drift (other batch shapes, kernels, hardware); a
claimed token that is not the validator's argmax is tolerated as a near-tie only when its score is
within `logit_tolerance / T` of the best token the node's filters kept for certain, and the claim
itself may have passed them (see `filter_band` and `check_tokens`). Drift moves the filter
boundaries too: a token the validator's top-k or top-p lets in by a hair may have been cut on the
node, and its Gumbel noise can put it far ahead of the node's honest choice.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from protocol.types import SamplingParams

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
# Multipliers of the hash-prospector two-round mixer [16 21f0aaad 15 d35a2d97 15], with the top bit
# of the second one cleared so that every product of a 32-bit word stays below 2**63.
MIX_MULTIPLIER_1 = 0x21F0AAAD
MIX_MULTIPLIER_2 = 0x735A2D97
SEED_DOMAIN = 0x9E3779B9
TOKEN_DOMAIN = 0x85EBCA6B
NOISE_BITS = 24

# Per-sample seeds are derived with splitmix64 (pure Python integers: exact everywhere).
SPLITMIX_INCREMENT = 0x9E3779B97F4A7C15
SPLITMIX_MULTIPLIER_1 = 0xBF58476D1CE4E5B9
SPLITMIX_MULTIPLIER_2 = 0x94D049BB133111EB

# Drift in logit units under which a validator tolerates a near-tie, and the largest tolerated
# |claimed - recomputed| log-probability of a sampled token (nats at T = 1; a log-probability is of
# logits / T, so the bound is this / T, see logprob_drift_bound). Measured decode (batch 1-32, 1-2
# threads) vs prefill on random-init Qwen2 models, logits of magnitude <= 8:
#   fp32: tolerated score gaps 0 (no token ever differed in 51,240), log-prob drift <= 1.6e-5;
#   bf16: score gaps up to 0.21 at T = 0.7 (0.15 logits), 0.7% of tokens differ; drift <= 0.08.
# Across engines the bf16 drift is larger (session 4, 2-core EPYC): a vLLM 0.32 node replayed on the
# torch validator, default model, 15,046 tokens at T = 1 and 0.7: score gaps <= 0.19, log-prob drift
# <= 0.248 at T = 1 and 0.361 at T = 0.7 (0.253 times T), 8 tokens above the old bound of 0.15; a
# validator on eager attention against SDPA nodes: gaps <= 0.17, drift <= 0.28. So a bf16 node may
# shade its log-probabilities by up to MAX_LOGPROB_DRIFT / T undetected; the trainer's ratio mask
# bounds what that buys. A bf16 -> fp16 precision swap drifts by 0.2 nats (the pooled commitment
# catches it).
DEFAULT_LOGIT_TOLERANCE = 0.3
MAX_LOGPROB_DRIFT = 0.4
# Replayed on the other attention kernel (the measurement of DOUBT_GAP_FACTOR below), 8 honest bf16
# rollouts of 78,144 had one token each over the drift bound: 0.403, 0.405, 0.445, 0.468 and 0.682
# against 0.4 at T = 1, 0.597, 0.676 and 0.761 against 0.571 at T = 0.7: at most 1.71 times the bound;
# across engines (vLLM against the torch validator, ~443,000 tokens) up to 3.05 times, on the default
# model's ill-conditioned end-of-sequence logit. One such token within 4 times the bound is doubted
# (more checks of the node; a node doubted often is struck), not struck. fp32 drift never came within
# 60 times its bound: no doubt there, so a numerical change caught at 1.2-2 times it stays a strike.
BF16_DRIFT_DOUBT_FACTOR = 4.0
FP32_LOGIT_TOLERANCE = 1e-3
FP32_MAX_LOGPROB_DRIFT = 1e-3
# A mismatch whose score gap is over the tolerance by at most this factor is within reach of honest
# drift: a validator doubts it instead of striking (coordinator/verdicts.py, MAX_DOUBTED_MISMATCHES).
# Measured (2-core EPYC under load, bootstrapped default model, bf16 torch nodes replayed on the other
# attention kernel: eager node / SDPA validator at T = 1 and at T = 0.7 with top-k 20 / top-p 0.9, SDPA
# node / eager validator at T = 1; 78,144 rollouts, 391,206 tokens): 1,064 tokens differed, all within
# the tolerance but 2, at 1.10 and 2.19 times it, each the only one of its rollout (an earlier round saw
# 3 in 12,000 rollouts just over it). The gaps have a tail (eager node / SDPA validator at T = 1, 287
# differing tokens, in units of the tolerance: 209 under 0.1, 59 in 0.1-0.2, 14 in 0.2-0.3, 3 in 0.3-0.5,
# 1 in 0.5-1, then 2.19), so the bound sits above the largest honest gap seen, with room: 3 times it.
DOUBT_GAP_FACTOR = 3.0
# Drift moves filter boundaries, and one ill-conditioned logit can move one a long way: the default
# model's end-of-sequence logit differs by 1.28 between SDPA and eager attention in bf16 where every
# other logit agrees within 0.03, and vLLM's sits 0.75-1.2 below transformers'. The nucleus it belongs
# to then holds another mass, and a token that the node's top-p let in can lie outside the band of
# filter_band at the tolerance (seen once in ~443,000 tokens of an honest vLLM bf16 node: a strike at a
# score gap of 0). A claim outside that band but inside the band at FILTER_DOUBT_FACTOR times the
# tolerance (where every logit may drift by half of it: 0.9 logits in bf16, so the odds of any mass
# may move by e^1.8, the drift of the EOS logit and all the others together) is doubted
# (TokenVerdict.FILTER_DOUBT), not struck, when its score gap is within DOUBT_GAP_FACTOR times the
# tolerance; a claim outside that band stays a mismatch. fp32 drift (1e-5) never comes near its band.
FILTER_DOUBT_FACTOR = 6.0


def logprob_drift_bound(max_logprob_drift: float, temperature: float) -> float:
    """The largest tolerated |claimed - recomputed| log-probability at this temperature, for a
    bound stated at T = 1: a log-probability is of logits / T, so a drift of the logits moves it
    1 / T as far (T = 0: of the raw logits)."""
    return max_logprob_drift if temperature == 0.0 else max_logprob_drift / temperature


@dataclass(frozen=True)
class ReplayTolerances:
    logit_tolerance: float
    max_logprob_drift: float
    # One token's drift over max_logprob_drift by at most this factor is doubted, not struck (1: never).
    drift_doubt_factor: float = 1.0


def tolerances_for(compute_dtype: str) -> ReplayTolerances:
    """Replay tolerances for a validator and nodes computing in this dtype ("float32", "bfloat16")."""
    if compute_dtype == "float32":
        return ReplayTolerances(FP32_LOGIT_TOLERANCE, FP32_MAX_LOGPROB_DRIFT)
    return ReplayTolerances(DEFAULT_LOGIT_TOLERANCE, MAX_LOGPROB_DRIFT, BF16_DRIFT_DOUBT_FACTOR)


_U32 = np.uint64


class SamplingParamsError(ValueError):
    """Sampling parameters outside their domain."""


def validate_params(params: SamplingParams) -> None:
    if not (params.temperature >= 0.0 and np.isfinite(params.temperature)):
        raise SamplingParamsError(f"temperature must be a finite number >= 0, got {params.temperature}")
    if params.top_k < 0:
        raise SamplingParamsError(f"top_k must be >= 0 (0 disables it), got {params.top_k}")
    if not 0.0 < params.top_p <= 1.0:
        raise SamplingParamsError(f"top_p must be in (0, 1] (1 disables it), got {params.top_p}")


def mix32(x: np.ndarray) -> np.ndarray:
    """Bijective mix of 32-bit words stored in uint64."""
    x = x ^ (x >> _U32(16))
    x = (x * _U32(MIX_MULTIPLIER_1)) & _U32(MASK32)
    x = x ^ (x >> _U32(15))
    x = (x * _U32(MIX_MULTIPLIER_2)) & _U32(MASK32)
    return x ^ (x >> _U32(15))


def _check_u64(name: str, value: int) -> None:
    if not 0 <= value <= MASK64:
        raise SamplingParamsError(f"{name} must be an unsigned 64-bit integer, got {value}")


def _splitmix64(x: int) -> int:
    z = (x + SPLITMIX_INCREMENT) & MASK64
    z = ((z ^ (z >> 30)) * SPLITMIX_MULTIPLIER_1) & MASK64
    z = ((z ^ (z >> 27)) * SPLITMIX_MULTIPLIER_2) & MASK64
    return z ^ (z >> 31)


def derive_sample_seed(lease_seed: int, prompt_position: int, sample_index: int) -> int:
    """The seed of sample `sample_index` of the prompt at `prompt_position` in a lease."""
    for name, value in (
        ("lease_seed", lease_seed),
        ("prompt_position", prompt_position),
        ("sample_index", sample_index),
    ):
        _check_u64(name, value)
    return _splitmix64(_splitmix64(_splitmix64(lease_seed) ^ prompt_position) ^ sample_index)


def row_keys(seeds: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two 32-bit keys per row from (seed: uint64, position: < 2**32)."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    positions = np.asarray(positions, dtype=np.uint64)
    if np.any(positions > _U32(MASK32)):
        raise SamplingParamsError("positions must be below 2**32")
    seed_lo = seeds & _U32(MASK32)
    seed_hi = seeds >> _U32(32)
    key0 = mix32(mix32(mix32(seed_lo ^ _U32(SEED_DOMAIN)) ^ seed_hi) ^ positions)
    key1 = mix32(key0 ^ _U32(TOKEN_DOMAIN))
    return key0, key1


def noise_bits(seeds: np.ndarray, positions: np.ndarray, vocab_size: int) -> np.ndarray:
    """[rows, vocab_size] 24-bit hash words (uint64) for token ids 0..vocab_size-1."""
    key0, key1 = row_keys(seeds, positions)
    token_ids = np.arange(vocab_size, dtype=np.uint64)[None, :]
    bits = mix32(mix32(token_ids ^ key1[:, None]) ^ key0[:, None])
    return bits >> _U32(32 - NOISE_BITS)


def gumbel_from_bits(bits: np.ndarray) -> np.ndarray:
    """Gumbel(0, 1) noise (float32) from 24-bit words."""
    uniform = (2.0 * bits.astype(np.float64) + 1.0) * 2.0 ** -(NOISE_BITS + 1)
    return (-np.log(-np.log(uniform))).astype(np.float32)


def gumbel_noise(seeds: np.ndarray, positions: np.ndarray, vocab_size: int) -> np.ndarray:
    return gumbel_from_bits(noise_bits(seeds, positions, vocab_size))


def inverse_temperature(temperature: float) -> np.float32:
    return np.float32(1.0 / temperature)


def _log_softmax_at(z: np.ndarray, allowed: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    masked = np.where(allowed, z, np.float32(-np.inf))
    top = masked.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(masked - top).sum(axis=1, dtype=np.float32)) + top[:, 0]
    rows = np.arange(z.shape[0])
    return np.asarray(z[rows, token_ids] - log_norm, dtype=np.float32)


def _nucleus_cutoff(
    descending: np.ndarray, threshold_k: np.ndarray, top_p: np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Over rows of scaled logits sorted descending, of which those >= threshold_k survive top-k:
    the index of the last token top-p keeps (the first where the cumulative probability reaches
    top_p; the last survivor if rounding keeps the sum below it), and whether top_p was reached."""
    survives = descending >= threshold_k[:, None]
    survivors = np.where(survives, descending, np.float32(-np.inf))
    shifted = np.exp(survivors - survivors[:, :1])
    probs = shifted / shifted.sum(axis=1, keepdims=True, dtype=np.float32)
    reached = np.cumsum(probs, axis=1, dtype=np.float32) >= top_p
    is_reached = np.asarray(reached.any(axis=1))
    return np.asarray(np.where(is_reached, reached.argmax(axis=1), survives.sum(axis=1) - 1)), is_reached


def _top_k_threshold(descending: np.ndarray, top_k: int) -> np.ndarray:
    num_rows, vocab_size = descending.shape
    if 0 < top_k < vocab_size:
        return descending[:, top_k - 1].copy()
    return np.full(num_rows, -np.inf, dtype=np.float32)


def filter_threshold(scaled: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Per row, the smallest scaled logit still allowed by top-k and top-p (float32 [rows])."""
    num_rows = scaled.shape[0]
    if top_k == 0 and top_p >= 1.0:
        return np.full(num_rows, -np.inf, dtype=np.float32)
    descending = -np.sort(-scaled, axis=1)
    threshold = _top_k_threshold(descending, top_k)
    if top_p < 1.0:
        cutoff, _ = _nucleus_cutoff(descending, threshold, np.float32(top_p))
        threshold = np.maximum(threshold, descending[np.arange(num_rows), cutoff])
    return threshold


def nucleus_band(top_p: float, tolerance: float) -> tuple[np.float32, np.float32]:
    """The top-p values that bound a node's nucleus when its scaled logits may differ from the
    validator's by up to tolerance / 2 each: the mass of any set of tokens then has odds
    (mass / (1 - mass)) within a factor exp(+-tolerance) of the validator's, so the narrow and wide
    values are top_p with its odds divided and multiplied by exp(tolerance). Computed in float64
    from the float32 top_p and tolerance, rounded once to float32."""
    top_p64, tolerance64 = float(np.float32(top_p)), float(np.float32(tolerance))
    rest = 1.0 - top_p64
    return (
        np.float32(top_p64 / (top_p64 + rest * math.exp(tolerance64))),
        np.float32(top_p64 / (top_p64 + rest * math.exp(-tolerance64))),
    )


def filter_band(scaled: np.ndarray, top_k: int, top_p: float, tolerance: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Per row, two thresholds on the scaled logits for a node whose scaled logits may differ from
    these by up to tolerance / 2 each: tokens at or above the first are in the node's allowed set
    for certain; tokens below the second are certainly not in it. Top-k: the k-th largest plus and
    minus the tolerance (an order statistic moves no more than the values do). Top-p: the nucleus
    threshold at the narrow top-p of nucleus_band plus the tolerance, and the one at the wide top-p
    minus the tolerance where that top-p is reached. (Every token the node ranks above one at the
    first bound, the validator ranks above its narrow cutoff: a mass below the narrow top-p, so
    below top_p on the node. Every token the validator ranks up to its wide cutoff, the node ranks
    above one under the second bound: a mass of at least top_p on the node.) Where top-k cuts
    within its band the two sides renormalise over different survivors, which these bounds do not
    cover. Both are -inf without filters."""
    num_rows = scaled.shape[0]
    minus_inf = np.full(num_rows, -np.inf, dtype=np.float32)
    if top_k == 0 and top_p >= 1.0:
        return minus_inf, minus_inf
    descending = -np.sort(-scaled, axis=1)
    threshold_k = _top_k_threshold(descending, top_k)
    certain, possible = threshold_k + tolerance, threshold_k - tolerance
    if top_p < 1.0:
        rows = np.arange(num_rows)
        narrow, wide = nucleus_band(top_p, float(tolerance))
        cutoff, _ = _nucleus_cutoff(descending, threshold_k, narrow)
        certain = np.maximum(certain, descending[rows, cutoff] + tolerance)
        cutoff, is_reached = _nucleus_cutoff(descending, threshold_k, wide)
        possible = np.where(is_reached, np.maximum(possible, descending[rows, cutoff] - tolerance), possible)
    return certain, possible


@dataclass(frozen=True)
class SampledTokens:
    """One sampling step over rows: token ids, their log-probabilities and near-tie margins."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    margins: np.ndarray


def _top_two_gap(scores: np.ndarray) -> np.ndarray:
    if scores.shape[1] < 2:
        return np.full(scores.shape[0], np.inf, dtype=np.float32)
    top_two = -np.partition(-scores, 1, axis=1)[:, :2]
    with np.errstate(invalid="ignore"):
        gap = top_two[:, 0] - top_two[:, 1]
    return np.where(np.isneginf(top_two[:, 1]), np.float32(np.inf), gap).astype(np.float32)


@dataclass(frozen=True)
class _Scored:
    scores: np.ndarray
    scaled: np.ndarray
    allowed: np.ndarray


def _score(logits: np.ndarray, seeds: np.ndarray, positions: np.ndarray, params: SamplingParams) -> _Scored:
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2:
        raise SamplingParamsError(f"logits must be [rows, vocab], got shape {logits.shape}")
    num_rows = logits.shape[0]
    seeds = np.broadcast_to(np.asarray(seeds, dtype=np.uint64), (num_rows,))
    positions = np.broadcast_to(np.asarray(positions, dtype=np.uint64), (num_rows,))
    if params.temperature == 0.0:
        everything = np.ones(logits.shape, dtype=bool)
        return _Scored(logits, logits, everything)
    scaled = logits * inverse_temperature(params.temperature)
    threshold = filter_threshold(scaled, params.top_k, params.top_p)
    allowed = scaled >= threshold[:, None]
    noise = gumbel_noise(seeds, positions, logits.shape[1])
    scores = np.where(allowed, scaled + noise, np.float32(-np.inf))
    return _Scored(scores, scaled, allowed)


def sample_tokens(
    logits: np.ndarray, seeds: np.ndarray, positions: np.ndarray, params: SamplingParams
) -> SampledTokens:
    """Apply the rule to rows of logits [rows, vocab] with a seed and a position per row
    (scalars broadcast)."""
    validate_params(params)
    scored = _score(logits, seeds, positions, params)
    token_ids = scored.scores.argmax(axis=1)
    logprobs = _log_softmax_at(scored.scaled, scored.allowed, token_ids)
    return SampledTokens(token_ids, logprobs, _top_two_gap(scored.scores))


class TokenVerdict(enum.IntEnum):
    EXACT = 0
    NEAR_TIE = 1
    MISMATCH = 2
    # A mismatch only because the validator's filters cut the claim where a node's drifted ones may
    # not have (FILTER_DOUBT_FACTOR): a doubt, not a strike (doubted_mismatches).
    FILTER_DOUBT = 3


@dataclass(frozen=True)
class TokenChecks:
    """Per position: the verdict, the validator's log-probability of the claimed token, and how far
    the claimed token's perturbed score falls below the validator's best (0 when it is the best)."""

    verdicts: np.ndarray
    logprobs: np.ndarray
    score_gaps: np.ndarray

    @property
    def num_near_ties(self) -> int:
        return int((self.verdicts == TokenVerdict.NEAR_TIE).sum())

    @property
    def mismatched(self) -> np.ndarray:
        """Per position: the claim is no near-tie of the validator's choice (MISMATCH or FILTER_DOUBT)."""
        return np.asarray((self.verdicts == TokenVerdict.MISMATCH) | (self.verdicts == TokenVerdict.FILTER_DOUBT))

    @property
    def num_mismatches(self) -> int:
        return int(self.mismatched.sum())


def score_tolerance(logit_tolerance: float, temperature: float) -> np.float32:
    """The tolerance in units of perturbed scores (scaled logits): logit_tolerance / T, as a float32
    multiply by the rounded reciprocal (T = 0: of the raw logits)."""
    if temperature == 0.0:
        return np.float32(logit_tolerance)
    return np.float32(np.float32(logit_tolerance) * inverse_temperature(temperature))


def doubted_mismatches(checks: TokenChecks, tolerance: np.ndarray | np.float32) -> np.ndarray:
    """Per position: a mismatch whose score gap is over `tolerance` (score units: score_tolerance, a
    scalar or one per position) by at most DOUBT_GAP_FACTOR times it, or a claim just outside the
    filter band (TokenVerdict.FILTER_DOUBT). A mismatch at a gap within the tolerance is a token the
    node's filters cut for certain (even under FILTER_DOUBT_FACTOR times the drift), never doubted."""
    gaps = checks.score_gaps
    return np.asarray(
        (checks.verdicts == TokenVerdict.FILTER_DOUBT)
        | (
            (checks.verdicts == TokenVerdict.MISMATCH)
            & (gaps > tolerance)
            & (gaps <= np.float32(DOUBT_GAP_FACTOR) * tolerance)
        )
    )


def check_tokens(
    logits: np.ndarray,
    token_ids: np.ndarray,
    seeds: np.ndarray,
    positions: np.ndarray,
    params: SamplingParams,
    logit_tolerance: float = DEFAULT_LOGIT_TOLERANCE,
) -> TokenChecks:
    """Validator side: does each claimed token follow the rule under these (recomputed) logits?

    A claimed token that is not the argmax is a near-tie when its perturbed score is at most
    logit_tolerance / T below the best of the tokens the node's filters allowed for certain, and
    it may itself have been allowed (`filter_band`, with tolerance logit_tolerance / T): a token
    that a drifted filter boundary lets in on the validator's side only is no competitor. A claim
    that may have passed the node's filters only under FILTER_DOUBT_FACTOR times that drift, at a
    score gap within DOUBT_GAP_FACTOR times the tolerance, is a FILTER_DOUBT; anything else is a
    mismatch. The score gap is that distance (0 for the argmax, and where no token allowed
    for certain beats the claim)."""
    validate_params(params)
    scored = _score(logits, seeds, positions, params)
    token_ids = np.asarray(token_ids, dtype=np.int64)
    num_rows, vocab_size = scored.scores.shape
    if token_ids.shape != (num_rows,):
        raise SamplingParamsError(f"need one token id per row ({num_rows}), got {token_ids.shape}")
    if np.any((token_ids < 0) | (token_ids >= vocab_size)):
        raise SamplingParamsError(f"token ids must be in [0, {vocab_size})")
    rows = np.arange(num_rows)
    best = scored.scores.argmax(axis=1)
    greedy = params.temperature == 0.0
    tolerance = score_tolerance(logit_tolerance, params.temperature)
    if greedy:
        claimed = scored.scores[rows, token_ids]
        certain = possible = possible_in_doubt = np.full(num_rows, -np.inf, dtype=np.float32)
    else:
        noise = gumbel_noise(
            np.broadcast_to(np.asarray(seeds, dtype=np.uint64), (num_rows,)),
            np.broadcast_to(np.asarray(positions, dtype=np.uint64), (num_rows,)),
            vocab_size,
        )
        claimed = scored.scaled[rows, token_ids] + noise[rows, token_ids]
        certain, possible = filter_band(scored.scaled, params.top_k, params.top_p, tolerance)
        _, possible_in_doubt = filter_band(
            scored.scaled, params.top_k, params.top_p, np.float32(FILTER_DOUBT_FACTOR) * tolerance
        )
    best_certain = np.where(scored.scaled >= certain[:, None], scored.scores, np.float32(-np.inf)).max(axis=1)
    score_gaps = np.where(
        best == token_ids, np.float32(0.0), np.maximum(best_certain - claimed, np.float32(0.0))
    ).astype(np.float32)
    claimed_scaled = scored.scaled[rows, token_ids]
    may_be_allowed = claimed_scaled >= possible
    near_filter = (
        ~may_be_allowed
        & (claimed_scaled >= possible_in_doubt)
        & (score_gaps <= np.float32(DOUBT_GAP_FACTOR) * tolerance)
    )
    verdicts = np.where(
        best == token_ids,
        TokenVerdict.EXACT,
        np.where(
            (score_gaps <= tolerance) & may_be_allowed,
            TokenVerdict.NEAR_TIE,
            np.where(near_filter, TokenVerdict.FILTER_DOUBT, TokenVerdict.MISMATCH),
        ),
    ).astype(np.int8)
    allowed_with_claim = scored.allowed.copy()
    allowed_with_claim[rows, token_ids] = True
    logprobs = _log_softmax_at(scored.scaled, allowed_with_claim, token_ids)
    return TokenChecks(verdicts, logprobs, score_gaps)
