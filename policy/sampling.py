"""The seeded sampling rule in torch, batched over rows with a seed, position and parameters per
row. Definitions live in protocol/sampling.py; this module computes the same noise bit for bit on
CPU and CUDA (integer ops on int64 words below 2**32, products below 2**63, float64 logs rounded
once to float32)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from protocol import sampling as rule
from protocol.types import SamplingParams

_MASK32 = rule.MASK32


@dataclass(frozen=True)
class RowSampling:
    """Sampling parameters and seeds of a batch, one entry per row, on the logits' device."""

    temperature: torch.Tensor  # float64 [rows]
    inverse_t: torch.Tensor  # float32 [rows]: float32(1 / T), 1 at T = 0
    top_k: torch.Tensor  # int64 [rows]
    top_p: torch.Tensor  # float32 [rows]
    seed_lo: torch.Tensor  # int64 [rows], low 32 bits of the seed
    seed_hi: torch.Tensor  # int64 [rows], high 32 bits
    uses_top_k: bool
    uses_top_p: bool
    uses_greedy: bool

    @classmethod
    def build(cls, params: Sequence[SamplingParams], seeds: Sequence[int], device: torch.device | str) -> RowSampling:
        if len(params) != len(seeds):
            raise rule.SamplingParamsError("need one seed per row of sampling parameters")
        for row_params in params:
            rule.validate_params(row_params)
        for seed in seeds:
            if not 0 <= seed <= rule.MASK64:
                raise rule.SamplingParamsError(f"seed must be an unsigned 64-bit integer, got {seed}")
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float64, device=device)
        greedy = temperature == 0.0
        return cls(
            temperature=temperature,
            inverse_t=torch.where(greedy, 1.0, 1.0 / torch.where(greedy, 1.0, temperature)).to(torch.float32),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            seed_lo=torch.tensor([s & _MASK32 for s in seeds], dtype=torch.int64, device=device),
            seed_hi=torch.tensor([s >> 32 for s in seeds], dtype=torch.int64, device=device),
            uses_top_k=any(p.temperature > 0 and p.top_k > 0 for p in params),
            uses_top_p=any(p.temperature > 0 and p.top_p < 1.0 for p in params),
            uses_greedy=any(p.temperature == 0 for p in params),
        )

    def select(self, rows: torch.Tensor) -> RowSampling:
        return RowSampling(
            self.temperature[rows],
            self.inverse_t[rows],
            self.top_k[rows],
            self.top_p[rows],
            self.seed_lo[rows],
            self.seed_hi[rows],
            self.uses_top_k,
            self.uses_top_p,
            self.uses_greedy,
        )


def mix32(x: torch.Tensor) -> torch.Tensor:
    return _mix32_(x.clone())


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """mix32 in place."""
    x ^= x >> 16
    x.mul_(rule.MIX_MULTIPLIER_1).bitwise_and_(_MASK32)
    x ^= x >> 15
    x.mul_(rule.MIX_MULTIPLIER_2).bitwise_and_(_MASK32)
    x ^= x >> 15
    return x


@dataclass(frozen=True)
class NoiseKeys:
    """The two hash keys of the noise of each row at its position (protocol.sampling.row_keys),
    int64 [rows]. A generation loop computes them for all its steps at once (noise_keys over
    [rows, steps]) and takes a column per step."""

    key0: torch.Tensor
    key1: torch.Tensor

    def at_step(self, step: int) -> NoiseKeys:
        return NoiseKeys(self.key0[:, step], self.key1[:, step])


def noise_keys(seed_lo: torch.Tensor, seed_hi: torch.Tensor, positions: torch.Tensor) -> NoiseKeys:
    key0 = mix32(mix32(mix32(seed_lo ^ rule.SEED_DOMAIN) ^ seed_hi) ^ positions)
    return NoiseKeys(key0, mix32(key0 ^ rule.TOKEN_DOMAIN))


def noise_bits_at(keys: NoiseKeys, vocab_size: int) -> torch.Tensor:
    token_ids = torch.arange(vocab_size, dtype=torch.int64, device=keys.key0.device)[None, :]
    bits = _mix32_(token_ids ^ keys.key1[:, None])
    bits ^= keys.key0[:, None]
    return _mix32_(bits).bitwise_right_shift_(32 - rule.NOISE_BITS)


def noise_bits(seed_lo: torch.Tensor, seed_hi: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return noise_bits_at(noise_keys(seed_lo, seed_hi, positions), vocab_size)


def gumbel_from_bits(bits: torch.Tensor) -> torch.Tensor:
    # 2 * bits + 1 < 2**25 is exact in float64, and the scaling is by a power of two.
    uniform = bits.to(torch.float64).mul_(2.0).add_(1.0).mul_(2.0 ** -(rule.NOISE_BITS + 1))
    return uniform.log_().neg_().log_().neg_().to(torch.float32)


def _top_k_threshold(descending: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    num_rows, vocab_size = descending.shape
    minus_inf = torch.full((num_rows,), -torch.inf, dtype=descending.dtype, device=descending.device)
    k_index = (rows.top_k.clamp(1, vocab_size) - 1)[:, None]
    uses_k = (rows.top_k > 0) & (rows.top_k < vocab_size)
    return torch.where(uses_k, descending.gather(1, k_index)[:, 0], minus_inf)


def _nucleus_cutoff(
    descending: torch.Tensor, threshold_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """As protocol.sampling._nucleus_cutoff, with a top_p per row."""
    survives = descending >= threshold_k[:, None]
    survivors = torch.where(survives, descending, -torch.inf)
    shifted = torch.exp(survivors - survivors[:, :1])
    cumulative = torch.cumsum(shifted / shifted.sum(dim=1, keepdim=True), dim=1)
    reached = cumulative >= top_p[:, None]
    is_reached = reached.any(dim=1)
    return torch.where(is_reached, reached.to(torch.int8).argmax(dim=1), survives.sum(dim=1) - 1), is_reached


def _filter_threshold(descending: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    threshold = _top_k_threshold(descending, rows)
    if rows.uses_top_p:
        cutoff, _ = _nucleus_cutoff(descending, threshold, rows.top_p)
        threshold_p = descending.gather(1, cutoff[:, None])[:, 0]
        threshold = torch.where(rows.top_p < 1.0, torch.maximum(threshold, threshold_p), threshold)
    return threshold


def _filter_band(
    descending: torch.Tensor, rows: RowSampling, tolerance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """protocol.sampling.filter_band with parameters and a tolerance per row, over the scaled
    logits sorted descending."""
    threshold_k = _top_k_threshold(descending, rows)
    certain, possible = threshold_k + tolerance, threshold_k - tolerance
    if rows.uses_top_p:
        uses_p = rows.top_p < 1.0
        bands = [
            rule.nucleus_band(top_p, row_tolerance)
            for top_p, row_tolerance in zip(rows.top_p.tolist(), tolerance.tolist(), strict=True)
        ]
        narrow, wide = (
            torch.tensor(values, dtype=torch.float32, device=descending.device) for values in zip(*bands, strict=True)
        )
        cutoff, _ = _nucleus_cutoff(descending, threshold_k, narrow)
        certain = torch.where(
            uses_p, torch.maximum(certain, descending.gather(1, cutoff[:, None])[:, 0] + tolerance), certain
        )
        cutoff, is_reached = _nucleus_cutoff(descending, threshold_k, wide)
        possible = torch.where(
            uses_p & is_reached,
            torch.maximum(possible, descending.gather(1, cutoff[:, None])[:, 0] - tolerance),
            possible,
        )
    return certain, possible


@dataclass(frozen=True)
class _Scored:
    scores: torch.Tensor  # perturbed scores (raw logits at T = 0), -inf outside the allowed set
    scaled: torch.Tensor  # logits * float32(1 / T) (raw logits at T = 0)
    allowed: torch.Tensor | None  # None: every token (no filters)
    noise: torch.Tensor
    greedy: torch.Tensor
    inverse_t: torch.Tensor  # float32 [rows], 1 at T = 0
    descending: torch.Tensor | None  # scaled sorted descending per row, where filters are used


def _score(logits: torch.Tensor, positions: torch.Tensor, rows: RowSampling, keys: NoiseKeys | None = None) -> _Scored:
    logits = logits.to(torch.float32)
    greedy = rows.temperature == 0.0
    scaled = logits * rows.inverse_t[:, None]
    descending = None
    allowed = None
    if rows.uses_top_k or rows.uses_top_p:
        descending = scaled.sort(dim=1, descending=True).values
        minus_inf = torch.full((logits.shape[0],), -torch.inf, dtype=scaled.dtype, device=scaled.device)
        allowed = scaled >= torch.where(greedy, minus_inf, _filter_threshold(descending, rows))[:, None]
    if keys is None:
        keys = noise_keys(rows.seed_lo, rows.seed_hi, positions)
    noise = gumbel_from_bits(noise_bits_at(keys, logits.shape[1]))
    scores = scaled + noise
    if allowed is not None:
        scores.masked_fill_(~allowed, -torch.inf)
    if rows.uses_greedy:
        scores = torch.where(greedy[:, None], logits, scores)
    return _Scored(scores, scaled, allowed, noise, greedy, rows.inverse_t, descending)


def _log_softmax_at(scaled: torch.Tensor, allowed: torch.Tensor | None, token_ids: torch.Tensor) -> torch.Tensor:
    log_norm = torch.logsumexp(scaled if allowed is None else torch.where(allowed, scaled, -torch.inf), dim=1)
    return scaled.gather(1, token_ids[:, None])[:, 0] - log_norm


@dataclass(frozen=True)
class SampledTokens:
    token_ids: torch.Tensor  # int64 [rows]
    logprobs: torch.Tensor  # float32 [rows]
    margins: torch.Tensor  # float32 [rows]


def sample(
    logits: torch.Tensor, positions: torch.Tensor, rows: RowSampling, keys: NoiseKeys | None = None
) -> SampledTokens:
    """One step of the rule for logits [rows, vocab] at per-row positions (int64 [rows]); `keys`:
    the rows' noise keys at those positions, when the caller computed them ahead."""
    scored = _score(logits, positions, rows, keys)
    token_ids = scored.scores.argmax(dim=1)
    best = scored.scores.gather(1, token_ids[:, None])[:, 0]
    second = scored.scores.scatter(1, token_ids[:, None], -torch.inf).amax(dim=1)
    margins = torch.where(torch.isneginf(second), torch.inf, best - second)
    return SampledTokens(token_ids, _log_softmax_at(scored.scaled, scored.allowed, token_ids), margins)


@dataclass(frozen=True)
class TokenChecks:
    """As protocol.sampling.TokenChecks, one row per checked token (torch tensors)."""

    verdicts: torch.Tensor  # int8, protocol.sampling.TokenVerdict values
    logprobs: torch.Tensor  # float32
    score_gaps: torch.Tensor  # float32


def check_tokens(
    logits: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor, rows: RowSampling, logit_tolerance: float
) -> TokenChecks:
    """protocol.sampling.check_tokens for rows with their own seed, position and parameters: the
    same verdicts and score gaps bit for bit; log-probabilities within float32 rounding."""
    scored = _score(logits, positions, rows)
    vocab_size = scored.scores.shape[1]
    if bool(((token_ids < 0) | (token_ids >= vocab_size)).any()):
        raise rule.SamplingParamsError(f"token ids must be in [0, {vocab_size})")
    claim = token_ids[:, None]
    best = scored.scores.argmax(dim=1)
    tolerance = torch.tensor(logit_tolerance, dtype=torch.float32, device=logits.device) * scored.inverse_t
    claimed_scaled = scored.scaled.gather(1, claim)[:, 0]
    claimed = torch.where(
        scored.greedy, scored.scores.gather(1, claim)[:, 0], claimed_scaled + scored.noise.gather(1, claim)[:, 0]
    )
    minus_inf = torch.full_like(tolerance, -torch.inf)
    certain = possible = possible_in_doubt = minus_inf
    if scored.descending is not None:
        certain, possible = (
            torch.where(scored.greedy, minus_inf, bound) for bound in _filter_band(scored.descending, rows, tolerance)
        )
        doubt_tolerance = torch.tensor(rule.FILTER_DOUBT_FACTOR, dtype=torch.float32, device=logits.device) * tolerance
        possible_in_doubt = torch.where(
            scored.greedy, minus_inf, _filter_band(scored.descending, rows, doubt_tolerance)[1]
        )
    best_certain = torch.where(scored.scaled >= certain[:, None], scored.scores, -torch.inf).max(dim=1).values
    is_best = best == token_ids
    score_gaps = torch.where(is_best, 0.0, torch.clamp_min(best_certain - claimed, 0.0))
    may_be_allowed = claimed_scaled >= possible
    near_filter = (
        ~may_be_allowed
        & (claimed_scaled >= possible_in_doubt)
        & (score_gaps <= torch.tensor(rule.DOUBT_GAP_FACTOR, dtype=torch.float32, device=logits.device) * tolerance)
    )
    verdicts = torch.where(
        is_best,
        int(rule.TokenVerdict.EXACT),
        torch.where(
            (score_gaps <= tolerance) & may_be_allowed,
            int(rule.TokenVerdict.NEAR_TIE),
            torch.where(near_filter, int(rule.TokenVerdict.FILTER_DOUBT), int(rule.TokenVerdict.MISMATCH)),
        ),
    ).to(torch.int8)
    allowed_with_claim = None if scored.allowed is None else scored.allowed.scatter(1, claim, True)
    return TokenChecks(verdicts, _log_softmax_at(scored.scaled, allowed_with_claim, token_ids), score_gaps)
