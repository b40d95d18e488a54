"""Multi-turn generation with the torch engine: model turns sampled under the seeded rule,
environment turns appended as the environment answers.

Rows decode in lockstep, one token per row and step, as in the single-turn loop. A row whose model
turn ends with its task's turn end asks its environment (on the host, at once) and then feeds the
answer's tokens one per step, in the same batched forward passes in which the other rows sample:
no row waits for another's environment. The j-th sampled token of a rollout is sampled at rule
position j (environment tokens are not counted), and the activation commitment covers the sampled
tokens only, in chunks of CHUNK_TOKENS consecutive sampled tokens (docs/protocol.md).

A rollout ends at a stop token (STOP), or LENGTH when it holds max_tokens sampled tokens or its
environment's max_total_tokens tokens in all.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from envs.base import RolloutEnvironment
from policy import sampling
from policy.engine import GenerationRequest, GenerationResult, bf16_bits
from protocol import commitment
from protocol.types import FinishReason

if TYPE_CHECKING:
    from policy.engine import TorchEngine


class _Row:
    """One rollout being generated."""

    def __init__(self, request: GenerationRequest):
        assert request.environment is not None
        self.environment: RolloutEnvironment = request.environment
        self.max_tokens = request.sampling.max_tokens
        self.max_total_tokens = self.environment.limits.max_total_tokens
        self.token_ids: list[int] = []
        self.mask: list[bool] = []
        self.logprobs: list[float] = []
        self.margins: list[float] = []
        self.hidden_bits: list[torch.Tensor] = []
        self.pending: deque[int] = deque()
        self.num_sampled = 0
        self.num_turns = 0
        self.finish_reason: FinishReason | None = None

    @property
    def samples_next(self) -> bool:
        return self.finish_reason is None and not self.pending

    def feed_environment(self) -> None:
        self.token_ids.append(self.pending.popleft())
        self.mask.append(False)

    def add_sampled(self, token_id: int, is_stop: bool) -> None:
        self.token_ids.append(token_id)
        self.mask.append(True)
        self.num_sampled += 1
        if is_stop:
            self.finish_reason = FinishReason.STOP
        elif self.num_sampled == self.max_tokens or len(self.token_ids) >= self.max_total_tokens:
            self.finish_reason = FinishReason.LENGTH
        elif token_id == self.environment.turn_end_token_id:
            answer = self.environment.next_turn(self.token_ids, self.num_turns, len(self.mask) - self.num_sampled)
            if answer:
                self.num_turns += 1
                self.pending.extend(answer)

    def result(self) -> GenerationResult:
        assert self.finish_reason is not None
        bits = torch.stack(self.hidden_bits).to(torch.uint16).cpu().numpy()
        return GenerationResult(
            token_ids=tuple(self.token_ids),
            logprobs=tuple(self.logprobs),
            margins=tuple(self.margins),
            finish_reason=self.finish_reason,
            commitment=commitment.commit(bits),
            sampled_mask=tuple(self.mask),
        )


def max_completion_tokens(request: GenerationRequest) -> int:
    assert request.environment is not None
    limits = request.environment.limits
    return min(limits.max_total_tokens, request.sampling.max_tokens + limits.max_environment_tokens)


@torch.inference_mode()
def generate_turns(engine: TorchEngine, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    """One result per multi-turn request, in order (see the module docstring)."""
    device = engine.model.device
    rows = [_Row(request) for request in requests]
    row_sampling = sampling.RowSampling.build([r.sampling for r in requests], [r.seed for r in requests], device)
    stop_token_ids = set(engine.stop_token_ids.tolist())
    num_steps = max(max_completion_tokens(r) for r in requests)
    attention_mask, position_ids, cache, hidden = engine.prefill_prompts(requests, num_steps)
    prompt_width = attention_mask.shape[1] - num_steps
    for step in range(num_steps):
        # Each unfinished row takes one token a step: the next of its environment's, else a sampled one.
        sampling_rows = [index for index, row in enumerate(rows) if row.samples_next]
        for row in rows:
            if row.pending:
                row.feed_environment()
        if sampling_rows:
            _sample(engine, rows, sampling_rows, hidden, row_sampling, stop_token_ids)
        next_tokens = [row.token_ids[-1] for row in rows]
        if all(row.finish_reason is not None for row in rows):
            break
        position_ids = position_ids[:, -1:] + 1
        hidden = engine.decoder(
            input_ids=torch.tensor(next_tokens, dtype=torch.int64, device=device)[:, None],
            attention_mask=attention_mask[:, : prompt_width + step + 1],
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
    return [row.result() for row in rows]


def _sample(
    engine: TorchEngine,
    rows: Sequence[_Row],
    sampling_rows: Sequence[int],
    hidden: torch.Tensor,
    row_sampling: sampling.RowSampling,
    stop_token_ids: set[int],
) -> None:
    """One sampled token for each row in sampling_rows, at its rule position (its count of sampled tokens)."""
    device = hidden.device
    selected = torch.tensor(sampling_rows, dtype=torch.int64, device=device)
    params = row_sampling.select(selected)
    positions = torch.tensor([rows[i].num_sampled for i in sampling_rows], dtype=torch.int64, device=device)
    states = hidden[selected]
    sampled = sampling.sample(
        engine.lm_head(states), positions, params, sampling.noise_keys(params.seed_lo, params.seed_hi, positions)
    )
    bits = bf16_bits(states)
    for slot, (index, token_id, logprob, margin) in enumerate(
        zip(
            sampling_rows,
            sampled.token_ids.tolist(),
            sampled.logprobs.tolist(),
            sampled.margins.tolist(),
            strict=True,
        )
    ):
        row = rows[index]
        row.logprobs.append(logprob)
        row.margins.append(margin)
        row.hidden_bits.append(bits[slot])
        row.add_sampled(token_id, token_id in stop_token_ids)
