"""Validator side: one forward pass over prompt + completion on the trusted model, and the replay
of rollouts against it (sampling rule, log-probability drift, activation commitment), batched over
every rollout it is given.

The forward pass runs each distinct prompt once: rollouts of a group share their prompt, so its
states are computed for the group and its cache is copied to the group's rows before their
completions run. Rollouts are packed into passes of at most `max_batch_tokens` padded positions,
sorted by length so that little of a pass is padding.

A multi-turn rollout is prefilled whole, its environment turns in place; only its sampled tokens
are checked (the rule at position j for its j-th sampled token, the commitment over its sampled
tokens' states: policy/turns.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from policy import sampling
from policy.engine import bf16_bits, chunk_points, left_pad
from policy.model import logits_from_hidden
from protocol import commitment
from protocol import sampling as rule
from protocol.types import SamplingParams

DEFAULT_MAX_BATCH_TOKENS = 16384  # padded positions in one forward pass
_MAX_CHECK_VALUES = 2**24  # logits [tokens, vocab] held at once by the token check


class PrefillError(ValueError):
    """A prompt/completion pair that cannot be prefilled."""


@torch.inference_mode()
def completion_states(
    model: PreTrainedModel,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_token_id: int = 0,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> list[torch.Tensor]:
    """For each (prompt, completion) pair, the final hidden states that produced the logits of its
    completion tokens ([num_completion_tokens, hidden_size]: the state at the position before each
    token)."""
    for prompt, completion in pairs:
        if not prompt or not completion:
            raise PrefillError("prefill needs a non-empty prompt and a non-empty completion")
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for index, (prompt, _) in enumerate(pairs):
        by_prompt.setdefault(tuple(prompt), []).append(index)
    groups = sorted(by_prompt.items(), key=lambda item: len(item[0]) + max(len(pairs[i][1]) for i in item[1]))
    states: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    batch: list[tuple[tuple[int, ...], list[int]]] = []
    num_rows = width = 0
    for prompt, members in groups:
        group_width = len(prompt) + max(len(pairs[i][1]) for i in members)
        if batch and (num_rows + len(members)) * max(width, group_width) > max_batch_tokens:
            _prefill_groups(model, pairs, batch, pad_token_id, states)
            batch, num_rows, width = [], 0, 0
        batch.append((prompt, members))
        num_rows += len(members)
        width = max(width, group_width)
    if batch:
        _prefill_groups(model, pairs, batch, pad_token_id, states)
    return states


def _prefill_groups(
    model: PreTrainedModel,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    groups: Sequence[tuple[tuple[int, ...], list[int]]],
    pad_token_id: int,
    states: list[torch.Tensor],
) -> None:
    """One pass over the distinct prompts, then one over the completions of their rollouts
    (right-padded after the shared prompt cache; pads come last, so causal attention keeps them
    from every real position)."""
    device = model.device
    decoder = model.get_decoder()
    input_ids, prompt_mask, position_ids = left_pad([prompt for prompt, _ in groups], pad_token_id, device)
    cache = DynamicCache(config=model.config)
    prompt_states = decoder(
        input_ids=input_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[:, -1]
    members = [(group, index) for group, (_, indices) in enumerate(groups) for index in indices]
    width = max(len(pairs[index][1]) for _, index in members) - 1
    if width == 0:
        for group, index in members:
            states[index] = prompt_states[group][None]
        return
    rows = torch.tensor([group for group, _ in members], dtype=torch.int64, device=device)
    cache.batch_select_indices(rows)
    tokens = torch.full((len(members), width), pad_token_id, dtype=torch.int64)
    for row, (_, index) in enumerate(members):
        completion = pairs[index][1][:-1]
        tokens[row, : len(completion)] = torch.tensor(completion, dtype=torch.int64)
    prompt_lengths = torch.tensor([len(groups[group][0]) for group, _ in members], dtype=torch.int64)
    completion_positions = prompt_lengths[:, None] + torch.arange(width, dtype=torch.int64)[None, :]
    attention_mask = torch.cat([prompt_mask[rows], prompt_mask.new_ones((len(members), width))], dim=1)
    hidden = decoder(
        input_ids=tokens.to(device),
        attention_mask=attention_mask,
        position_ids=completion_positions.to(device),
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    for row, (group, index) in enumerate(members):
        states[index] = torch.cat([prompt_states[group][None], hidden[row, : len(pairs[index][1]) - 1]])


@dataclass(frozen=True)
class PrefillOutput:
    """For each completion token j: the logits it was sampled from and the final hidden state that
    produced them (the state at the position before it)."""

    logits: np.ndarray  # float32 [num_completion_tokens, vocab]
    hidden_bits: np.ndarray  # uint16 bf16 bits [num_completion_tokens, hidden_size]


@torch.inference_mode()
def prefill(
    model: PreTrainedModel, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int = 0
) -> list[PrefillOutput]:
    """Logits and final hidden states of (prompt, completion) pairs, as numpy arrays."""
    states = completion_states(model, pairs, pad_token_id)
    logits = logits_from_hidden(model, torch.cat(states)).to(torch.float32)
    return [
        PrefillOutput(row_logits.cpu().numpy(), bf16_bits(row_states).to(torch.uint16).cpu().numpy())
        for row_logits, row_states in zip(logits.split([len(s) for s in states]), states, strict=True)
    ]


@dataclass(frozen=True)
class ReplayReport:
    token_checks: rule.TokenChecks
    logprob_drift: np.ndarray  # |claimed - recomputed| per token
    commitment_checks: list[commitment.ChunkCheck]  # empty when the commitment cannot be decoded
    commitment_error: str | None = None  # why the commitment cannot be decoded
    temperature: float = 1.0  # the rollout's sampling temperature
    # For the node-level statistics (coordinator/node_stats.py), per token: claimed - recomputed
    # log-probability, and at a near-tie (or a mismatch close enough to be doubted,
    # protocol.sampling.doubted_mismatches) the claimed token's logit minus the validator's choice's
    # (positive: the node took the likelier token), 0 elsewhere.
    logprob_offsets: np.ndarray | None = None
    near_tie_lifts: np.ndarray | None = None

    @property
    def max_logprob_drift(self) -> float:
        return float(self.logprob_drift.max())

    def allowed_logprob_drift(self, max_logprob_drift: float) -> float:
        """The drift bound at this rollout's temperature, for a bound stated at T = 1."""
        return rule.logprob_drift_bound(max_logprob_drift, self.temperature)

    def passes(
        self,
        max_logprob_drift: float = rule.MAX_LOGPROB_DRIFT,
        thresholds: commitment.Thresholds | None = None,
    ) -> bool:
        """Every check within its bound (the bf16 commitment thresholds unless given)."""
        thresholds = thresholds or commitment.Thresholds()
        return (
            self.token_checks.num_mismatches == 0
            and self.max_logprob_drift <= self.allowed_logprob_drift(max_logprob_drift)
            and self.commitment_error is None
            and commitment.accepts(self.commitment_checks, thresholds)
        )


@dataclass(frozen=True)
class ClaimedRollout:
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    commitment: bytes
    sampling: SamplingParams
    seed: int
    sampled_mask: tuple[bool, ...] | None = None  # per token of token_ids; None: all sampled

    @property
    def sampled_token_ids(self) -> tuple[int, ...]:
        if self.sampled_mask is None:
            return self.token_ids
        return tuple(compress(self.token_ids, self.sampled_mask))


def sampled_states(rollout: ClaimedRollout, states: torch.Tensor) -> torch.Tensor:
    """The rows of a rollout's completion states that produced its sampled tokens."""
    if rollout.sampled_mask is None or all(rollout.sampled_mask):
        return states
    return states[torch.tensor(rollout.sampled_mask, dtype=torch.bool, device=states.device)]


@torch.inference_mode()
def replay(
    model: PreTrainedModel,
    rollouts: Sequence[ClaimedRollout],
    logit_tolerance: float = rule.DEFAULT_LOGIT_TOLERANCE,
    pad_token_id: int = 0,
) -> list[ReplayReport]:
    """Re-run rollouts by batched prefill and check them token by token, all rollouts together."""
    if not rollouts:
        return []
    states = [
        sampled_states(rollout, rollout_states)
        for rollout, rollout_states in zip(
            rollouts,
            completion_states(model, [(r.prompt_token_ids, r.token_ids) for r in rollouts], pad_token_id),
            strict=True,
        )
    ]
    lengths = [len(s) for s in states]
    token_checks, near_tie_lifts = _check_tokens(model, rollouts, torch.cat(states), lengths, logit_tolerance)
    commitment_results = _check_commitments(rollouts, states)
    reports = []
    for rollout, checks, lifts, (chunk_checks, error) in zip(
        rollouts, token_checks, near_tie_lifts, commitment_results, strict=True
    ):
        offsets = np.array(rollout.logprobs, dtype=np.float32) - checks.logprobs
        reports.append(
            ReplayReport(checks, np.abs(offsets), chunk_checks, error, rollout.sampling.temperature, offsets, lifts)
        )
    return reports


def _check_tokens(
    model: PreTrainedModel,
    rollouts: Sequence[ClaimedRollout],
    states: torch.Tensor,
    lengths: Sequence[int],
    logit_tolerance: float,
) -> tuple[list[rule.TokenChecks], list[np.ndarray]]:
    """The rule check of every token of every rollout, in blocks of bounded logits size; and per
    rollout its near-tie lifts (ReplayReport.near_tie_lifts)."""
    device = states.device
    lm_head = model.get_output_embeddings()
    per_rollout = sampling.RowSampling.build([r.sampling for r in rollouts], [r.seed for r in rollouts], device)
    owner = torch.repeat_interleave(torch.arange(len(rollouts), device=device), torch.tensor(lengths, device=device))
    positions = torch.cat([torch.arange(n, dtype=torch.int64, device=device) for n in lengths])
    token_ids = torch.tensor([t for r in rollouts for t in r.sampled_token_ids], dtype=torch.int64, device=device)
    vocab_size = lm_head.weight.shape[0]
    block = max(1, _MAX_CHECK_VALUES // vocab_size)
    parts = []
    lifts = np.zeros(len(token_ids), dtype=np.float32)
    tolerances = np.array(
        [rule.score_tolerance(logit_tolerance, r.sampling.temperature) for r in rollouts], dtype=np.float32
    )[owner.cpu().numpy()]
    for start in range(0, len(token_ids), block):
        end = start + block
        logits = logits_from_hidden(model, states[start:end]).to(torch.float32)
        parts.append(
            sampling.check_tokens(
                logits,
                token_ids[start:end],
                positions[start:end],
                per_rollout.select(owner[start:end]),
                logit_tolerance,
            )
        )
        block_checks = rule.TokenChecks(
            parts[-1].verdicts.cpu().numpy(), parts[-1].logprobs.cpu().numpy(), parts[-1].score_gaps.cpu().numpy()
        )
        tied = (block_checks.verdicts == rule.TokenVerdict.NEAR_TIE) | rule.doubted_mismatches(
            block_checks, tolerances[start:end]
        )
        for row in np.flatnonzero(tied).tolist():
            lifts[start + row] = _near_tie_lift(
                logits[row].cpu().numpy(),
                rollouts[int(owner[start + row])],
                int(positions[start + row]),
                int(token_ids[start + row]),
            )
    verdicts, logprobs, gaps = (
        torch.cat(values).cpu().numpy()
        for values in zip(*((p.verdicts, p.logprobs, p.score_gaps) for p in parts), strict=True)
    )
    splits = np.cumsum(lengths)[:-1]
    return (
        [
            rule.TokenChecks(v, lp, g)
            for v, lp, g in zip(
                np.split(verdicts, splits), np.split(logprobs, splits), np.split(gaps, splits), strict=True
            )
        ],
        np.split(lifts, splits),
    )


def _near_tie_lift(logits: np.ndarray, rollout: ClaimedRollout, position: int, claimed: int) -> float:
    """The claimed token's logit minus that of the token the rule picks under these logits (near-ties
    are rare: the numpy reference, bit-exact with the batched check, finds that token)."""
    best = int(
        rule.sample_tokens(logits[None], np.uint64(rollout.seed), np.uint64(position), rollout.sampling).token_ids[0]
    )
    return float(logits[claimed] - logits[best])


def _check_commitments(
    rollouts: Sequence[ClaimedRollout], states: Sequence[torch.Tensor]
) -> list[tuple[list[commitment.ChunkCheck], str | None]]:
    """Per rollout: its chunk checks, or the reason its commitment cannot be decoded. The points of
    every chunk of every rollout are selected in one pass and checked in one pass."""
    hidden_size = states[0].shape[1]
    proofs: list[list[commitment.ChunkProof] | None] = []
    errors: list[str | None] = []
    for rollout, rollout_states in zip(rollouts, states, strict=True):
        try:
            proofs.append(commitment.split_proofs(rollout.commitment, len(rollout_states), hidden_size))
            errors.append(None)
        except commitment.CommitmentError as error:
            proofs.append(None)
            errors.append(str(error))
    chunk_rows, chunk_owner, num_filled = [], [], []
    offset = 0
    for index, rollout_states in enumerate(states):
        if proofs[index] is not None:
            for start, end in commitment.chunk_bounds(len(rollout_states)):
                chunk_rows.append(offset + start + np.minimum(np.arange(commitment.CHUNK_TOKENS), end - start - 1))
                chunk_owner.append(index)
                num_filled.append(end - start)
        offset += len(rollout_states)
    results: list[tuple[list[commitment.ChunkCheck], str | None]] = [([], error) for error in errors]
    if not chunk_rows:
        return results
    bits = bf16_bits(torch.cat(list(states)))
    device = bits.device
    chunks = bits[torch.as_tensor(np.stack(chunk_rows), device=device)].flatten(1)
    num_values = torch.tensor(num_filled, dtype=torch.int64, device=device) * hidden_size
    # One point past the top k: the largest magnitude left out, where the cut lies.
    indices, values = (
        t.cpu().numpy() for t in chunk_points(chunks, min(commitment.TOP_K + 1, chunks.shape[1]), num_values)
    )
    chunk_proofs = [proof for rollout_proofs in proofs if rollout_proofs is not None for proof in rollout_proofs]
    num_points = np.array([len(proof.coefficients) for proof in chunk_proofs])
    has_cut = np.array(num_filled) * hidden_size > num_points
    cuts = np.where(
        has_cut,
        values[np.arange(len(num_points)), np.minimum(num_points, values.shape[1] - 1)]
        & commitment.BF16_MAGNITUDE_MASK,
        commitment.NO_CUT,
    )
    checks: list[commitment.ChunkCheck | None] = [None] * len(chunk_proofs)
    for size in np.unique(num_points):
        selected = np.flatnonzero(num_points == size)
        for chunk, check in zip(
            selected,
            commitment.check_points(
                [chunk_proofs[c] for c in selected],
                indices[selected, :size],
                values[selected, :size],
                cuts[selected],
                [num_filled[c] for c in selected],
                hidden_size,
            ),
            strict=True,
        ):
            checks[chunk] = check
    for owner, check in zip(chunk_owner, checks, strict=True):
        assert check is not None
        results[owner][0].append(check)
    return results
