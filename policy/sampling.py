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
    top_k: torch.Tensor  # int64 [rows]
    top_p: torch.Tensor  # float32 [rows]
    seed_lo: torch.Tensor  # int64 [rows], low 32 bits of the seed
    seed_hi: torch.Tensor  # int64 [rows], high 32 bits
    uses_top_k: bool
    uses_top_p: bool

    @classmethod
    def build(cls, params: Sequence[SamplingParams], seeds: Sequence[int],
              device: torch.device | str) -> RowSampling:
        if len(params) != len(seeds):
            raise rule.SamplingParamsError("need one seed per row of sampling parameters")
        for row_params in params:
            rule.validate_params(row_params)
        for seed in seeds:
            if not 0 <= seed <= rule.MASK64:
                raise rule.SamplingParamsError(f"seed must be an unsigned 64-bit integer, got {seed}")
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float64, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            seed_lo=torch.tensor([s & _MASK32 for s in seeds], dtype=torch.int64, device=device),
            seed_hi=torch.tensor([s >> 32 for s in seeds], dtype=torch.int64, device=device),
            uses_top_k=any(p.temperature > 0 and p.top_k > 0 for p in params),
            uses_top_p=any(p.temperature > 0 and p.top_p < 1.0 for p in params),
        )

    def select(self, rows: torch.Tensor) -> RowSampling:
        return RowSampling(self.temperature[rows], self.top_k[rows], self.top_p[rows],
                           self.seed_lo[rows], self.seed_hi[rows], self.uses_top_k, self.uses_top_p)


def mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * rule.MIX_MULTIPLIER_1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * rule.MIX_MULTIPLIER_2) & _MASK32
    return x ^ (x >> 15)


def noise_bits(seed_lo: torch.Tensor, seed_hi: torch.Tensor, positions: torch.Tensor,
               vocab_size: int) -> torch.Tensor:
    key0 = mix32(mix32(mix32(seed_lo ^ rule.SEED_DOMAIN) ^ seed_hi) ^ positions)
    key1 = mix32(key0 ^ rule.TOKEN_DOMAIN)
    token_ids = torch.arange(vocab_size, dtype=torch.int64, device=positions.device)[None, :]
    bits = mix32(mix32(token_ids ^ key1[:, None]) ^ key0[:, None])
    return bits >> (32 - rule.NOISE_BITS)


def gumbel_from_bits(bits: torch.Tensor) -> torch.Tensor:
    uniform = (2 * bits + 1).to(torch.float64) * 2.0 ** -(rule.NOISE_BITS + 1)
    return (-torch.log(-torch.log(uniform))).to(torch.float32)


def gumbel_noise(seed_lo: torch.Tensor, seed_hi: torch.Tensor, positions: torch.Tensor,
                 vocab_size: int) -> torch.Tensor:
    return gumbel_from_bits(noise_bits(seed_lo, seed_hi, positions, vocab_size))


def _filter_threshold(scaled: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    num_rows, vocab_size = scaled.shape
    minus_inf = torch.full((num_rows,), -torch.inf, dtype=scaled.dtype, device=scaled.device)
    descending = scaled.sort(dim=1, descending=True).values
    k_index = (rows.top_k.clamp(1, vocab_size) - 1)[:, None]
    uses_k = (rows.top_k > 0) & (rows.top_k < vocab_size)
    threshold = torch.where(uses_k, descending.gather(1, k_index)[:, 0], minus_inf)
    if rows.uses_top_p:
        survives = descending >= threshold[:, None]
        survivors = torch.where(survives, descending, -torch.inf)
        shifted = torch.exp(survivors - survivors[:, :1])
        cumulative = torch.cumsum(shifted / shifted.sum(dim=1, keepdim=True), dim=1)
        reached = cumulative >= rows.top_p[:, None]
        cutoff = torch.where(reached.any(dim=1), reached.to(torch.int8).argmax(dim=1),
                             survives.sum(dim=1) - 1)
        threshold_p = torch.where(rows.top_p < 1.0, descending.gather(1, cutoff[:, None])[:, 0],
                                  minus_inf)
        threshold = torch.maximum(threshold, threshold_p)
    return threshold


@dataclass(frozen=True)
class SampledTokens:
    token_ids: torch.Tensor  # int64 [rows]
    logprobs: torch.Tensor  # float32 [rows]
    margins: torch.Tensor  # float32 [rows]


def sample(logits: torch.Tensor, positions: torch.Tensor, rows: RowSampling) -> SampledTokens:
    """One step of the rule for logits [rows, vocab] at per-row positions (int64 [rows])."""
    logits = logits.to(torch.float32)
    greedy = rows.temperature == 0.0
    inverse_t = torch.where(greedy, 1.0, 1.0 / torch.where(greedy, 1.0, rows.temperature))
    scaled = logits * inverse_t.to(torch.float32)[:, None]
    allowed = greedy[:, None].expand_as(scaled)
    if rows.uses_top_k or rows.uses_top_p:
        allowed = allowed | (scaled >= _filter_threshold(scaled, rows)[:, None])
    else:
        allowed = torch.ones_like(allowed)
    noise = gumbel_noise(rows.seed_lo, rows.seed_hi, positions, logits.shape[1])
    perturbed = torch.where(allowed, scaled + noise, -torch.inf)
    scores = torch.where(greedy[:, None], logits, perturbed)
    token_ids = scores.argmax(dim=1)
    top_two = scores.topk(2, dim=1).values
    margins = torch.where(torch.isneginf(top_two[:, 1]), torch.inf, top_two[:, 0] - top_two[:, 1])
    log_norm = torch.logsumexp(torch.where(allowed, scaled, -torch.inf), dim=1)
    logprobs = scaled.gather(1, token_ids[:, None])[:, 0] - log_norm
    return SampledTokens(token_ids, logprobs, margins)
