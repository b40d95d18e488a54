"""Validator side: one forward pass over prompt + completion on the trusted model, and the replay
of a rollout against it (sampling rule, log-probability drift, activation commitment)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from policy.engine import bf16_bits, left_pad
from protocol import commitment
from protocol import sampling as rule
from protocol.types import SamplingParams


class PrefillError(ValueError):
    """A prompt/completion pair that cannot be prefilled."""


@dataclass(frozen=True)
class PrefillOutput:
    """For each completion token j: the logits it was sampled from and the final hidden state that
    produced them (the state at the position before it)."""

    logits: np.ndarray  # float32 [num_completion_tokens, vocab]
    hidden_bits: np.ndarray  # uint16 bf16 bits [num_completion_tokens, hidden_size]


@torch.inference_mode()
def prefill(model: PreTrainedModel, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
            pad_token_id: int = 0) -> list[PrefillOutput]:
    """Prefill (prompt, completion) pairs in one left-padded batch."""
    for prompt, completion in pairs:
        if not prompt or not completion:
            raise PrefillError("prefill needs a non-empty prompt and a non-empty completion")
    # The last completion token's own state predicts nothing that was sampled: leave it out.
    sequences = [list(prompt) + list(completion[:-1]) for prompt, completion in pairs]
    input_ids, attention_mask, position_ids = left_pad(sequences, pad_token_id, model.device)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, use_cache=False).last_hidden_state
    outputs = []
    for row, (_, completion) in enumerate(pairs):
        states = hidden[row, hidden.shape[1] - len(completion):]
        logits = model.get_output_embeddings()(states).to(torch.float32)
        outputs.append(PrefillOutput(logits.cpu().numpy(),
                                     bf16_bits(states).to(torch.uint16).cpu().numpy()))
    return outputs


@dataclass(frozen=True)
class ReplayReport:
    token_checks: rule.TokenChecks
    logprob_drift: np.ndarray  # |claimed - recomputed| per token
    commitment_checks: list[commitment.ChunkCheck]

    @property
    def max_logprob_drift(self) -> float:
        return float(self.logprob_drift.max())

    def passes(self, max_logprob_drift: float = rule.MAX_LOGPROB_DRIFT,
               thresholds: commitment.Thresholds = commitment.Thresholds()) -> bool:
        return (self.token_checks.num_mismatches == 0
                and self.max_logprob_drift <= max_logprob_drift
                and commitment.accepts(self.commitment_checks, thresholds))


@dataclass(frozen=True)
class ClaimedRollout:
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    commitment: bytes
    sampling: SamplingParams
    seed: int


def replay(model: PreTrainedModel, rollouts: Sequence[ClaimedRollout],
           logit_tolerance: float = rule.DEFAULT_LOGIT_TOLERANCE,
           pad_token_id: int = 0) -> list[ReplayReport]:
    """Re-run rollouts by one batched prefill and check them token by token."""
    outputs = prefill(model, [(r.prompt_token_ids, r.token_ids) for r in rollouts], pad_token_id)
    reports = []
    for rollout, output in zip(rollouts, outputs):
        num_tokens = len(rollout.token_ids)
        checks = rule.check_tokens(output.logits, np.array(rollout.token_ids),
                                   np.uint64(rollout.seed), np.arange(num_tokens),
                                   rollout.sampling, logit_tolerance)
        drift = np.abs(np.array(rollout.logprobs, dtype=np.float32) - checks.logprobs)
        reports.append(ReplayReport(checks, drift,
                                    commitment.verify(rollout.commitment, output.hidden_bits)))
    return reports
