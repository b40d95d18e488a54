"""Generation engines: the interface nodes use, and the torch engine (CPU or CUDA).

An engine turns requests (prompt tokens, sampling parameters, a per-sample seed from
protocol.sampling.derive_sample_seed) into completions that follow the seeded sampling rule, with
per-token log-probabilities under the sampling distribution, near-tie margins, the finish reason
and the activation commitment. Completion token j is sampled at rule position j. A request with an
environment (a multi-turn task) interleaves environment turns (policy/turns.py): there the j-th
sampled token is sampled at rule position j, environment tokens not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from envs.base import RolloutEnvironment
from policy import sampling
from policy.model import logits_from_hidden
from protocol import commitment
from protocol.types import FinishReason, SamplingParams

DEFAULT_MAX_BATCH_SIZE = 32
_INDEX_BITS = 32  # top-k keys: magnitude bits above the (complemented) flat index
# On an accelerator, whether every row has finished is read back (a host sync) only every this many
# steps; the extra steps after the last row finished change no result.
_DONE_CHECK_INTERVAL = 8


class EngineRequestError(ValueError):
    """A generation request the engine cannot serve."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    seed: int
    environment: RolloutEnvironment | None = None  # a multi-turn task's, for this rollout


@dataclass(frozen=True)
class GenerationResult:
    token_ids: tuple[int, ...]  # every token after the prompt: model and environment turns
    logprobs: tuple[float, ...]  # one per sampled token
    margins: tuple[float, ...]  # best minus second-best perturbed score at each sampled token
    finish_reason: FinishReason
    commitment: bytes  # over the sampled tokens
    sampled_mask: tuple[bool, ...] | None = None  # per token, False where the environment put it; None: all sampled

    @property
    def mask(self) -> tuple[bool, ...]:
        return (True,) * len(self.token_ids) if self.sampled_mask is None else self.sampled_mask


def check_requests(requests: Sequence[GenerationRequest], *, runs_environments: bool = False) -> None:
    """Refuse requests no engine can serve, naming the problem; and multi-turn requests, unless the
    engine runs environments."""
    for request in requests:
        if request.environment is not None and not runs_environments:
            raise EngineRequestError(
                "this engine does not run multi-turn tasks (environment turns) yet: use the torch engine"
            )
        if not request.prompt_token_ids:
            raise EngineRequestError("a prompt needs at least one token")
        if request.sampling.max_tokens < 1:
            raise EngineRequestError(f"max_tokens must be >= 1, got {request.sampling.max_tokens}")


@runtime_checkable
class GenerationEngine(Protocol):
    name: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in order."""
        ...


def bf16_bits(hidden: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns of hidden states as int32 in [0, 65535]."""
    return hidden.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF


def chunk_points(
    chunk_bits: torch.Tensor, num_points: int, num_values: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-magnitude points of flattened chunks [rows, n] (ties: lower index), as the numpy
    reference protocol.commitment.top_indices selects them: (indices, bf16 bits), [rows, k], on the
    chunks' device. A row with num_values[row] < n holds a shorter chunk in its first values: only
    they are candidates, and a row with fewer than num_points of them fills the rest with others
    (callers keep the first num_values[row] points of such rows, which are its own)."""
    flat_size = chunk_bits.shape[1]
    if flat_size > 2**_INDEX_BITS:
        raise EngineRequestError(f"a commitment chunk of {flat_size} values is too large")
    index = torch.arange(flat_size, dtype=torch.int64, device=chunk_bits.device)
    keys = ((chunk_bits & commitment.BF16_MAGNITUDE_MASK).to(torch.int64) << _INDEX_BITS) | (2**_INDEX_BITS - 1 - index)
    if num_values is not None:
        keys = torch.where(index[None, :] < num_values[:, None], keys, -1 - index)
    indices = keys.topk(num_points, dim=1, sorted=num_values is not None).indices
    return indices, chunk_bits.gather(1, indices)


def left_pad(
    sequences: Sequence[Sequence[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids for left-padded sequences."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.int64)
    for row, tokens in enumerate(sequences):
        if tokens:
            input_ids[row, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.int64)
            attention_mask[row, width - len(tokens) :] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


class _CommitmentBuilder:
    """Final hidden states of the current chunk of every row. A chunk's points are selected on the
    device when the chunk closes; the proofs of all chunks are interpolated together at the end, so
    decoding never waits for the host."""

    def __init__(self, num_rows: int, hidden_size: int, device: torch.device):
        self.buffer = torch.zeros((num_rows, commitment.CHUNK_TOKENS, hidden_size), dtype=torch.int32, device=device)
        self.hidden_size = hidden_size
        self.closed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, step: int, hidden: torch.Tensor) -> None:
        self.buffer[:, step % commitment.CHUNK_TOKENS] = bf16_bits(hidden)

    def close_chunks(self, num_tokens: int, lengths: torch.Tensor) -> None:
        """Close, after the num_tokens-th step, the chunk of every row with a token in the window
        of steps that ends there (a multiple of CHUNK_TOKENS, or the last step). A row that finished
        inside the window closes a partial chunk: its slots were not overwritten since, as writes
        wrap around only after the window ends."""
        window_start = (num_tokens - 1) // commitment.CHUNK_TOKENS * commitment.CHUNK_TOKENS
        rows = torch.nonzero(lengths > window_start)[:, 0]
        filled = (lengths[rows] - window_start).clamp(max=commitment.CHUNK_TOKENS)
        num_values = filled * self.hidden_size
        chunks = self.buffer[rows].flatten(1)
        num_points = num_values.clamp(max=commitment.TOP_K)
        indices, values = chunk_points(chunks, min(commitment.TOP_K, chunks.shape[1]), num_values)
        self.closed.append((rows, num_points, indices, values))

    def proofs(self, num_rows: int) -> list[bytes]:
        """Each row's commitment: its chunks' proofs in order."""
        rows, num_points, indices, values = (torch.cat(parts).cpu().numpy() for parts in zip(*self.closed, strict=True))
        proofs = [b""] * len(rows)
        for size in np.unique(num_points):
            chunks = np.flatnonzero(num_points == size)
            for chunk, proof in zip(
                chunks, commitment.proofs_from_points(indices[chunks, :size], values[chunks, :size]), strict=True
            ):
                proofs[chunk] = proof
        commitments: list[list[bytes]] = [[] for _ in range(num_rows)]
        for row, proof in zip(rows, proofs, strict=True):
            commitments[row].append(proof)
        return [b"".join(parts) for parts in commitments]


class TorchEngine:
    """Batched, KV-cached, left-padded generation with a Hugging Face causal LM whose logits are
    computed from its decoder's final hidden states by policy.model.logits_from_hidden."""

    name = "torch"

    def __init__(
        self,
        model: PreTrainedModel,
        stop_token_ids: Collection[int],
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        pad_token_id: int = 0,
    ):
        if max_batch_size < 1:
            raise EngineRequestError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        self.decoder = model.get_decoder()
        self.lm_head = partial(logits_from_hidden, model)
        self.stop_token_ids = torch.tensor(sorted(stop_token_ids), dtype=torch.int64, device=model.device)
        self.max_batch_size = max_batch_size
        self.pad_token_id = pad_token_id

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        check_requests(requests, runs_environments=True)
        batch: Callable[[Sequence[GenerationRequest]], list[GenerationResult]] = self._generate_batch
        if any(r.environment is not None for r in requests):
            from policy.turns import generate_turns

            if not all(r.environment is not None for r in requests):
                raise EngineRequestError("a batch mixes multi-turn and single-turn requests")
            batch = partial(generate_turns, self)
        results: list[GenerationResult] = []
        for start in range(0, len(requests), self.max_batch_size):
            results.extend(batch(requests[start : start + self.max_batch_size]))
        return results

    def prefill_prompts(
        self, requests: Sequence[GenerationRequest], num_steps: int
    ) -> tuple[torch.Tensor, torch.Tensor, DynamicCache, torch.Tensor]:
        """Run the left-padded prompts through the decoder into a fresh KV cache. Returns the attention
        mask widened by num_steps decode positions, the prompts' position ids, the cache, and the final
        hidden state at each prompt's last position."""
        input_ids, attention_mask, position_ids = left_pad(
            [r.prompt_token_ids for r in requests], self.pad_token_id, self.model.device
        )
        prompt_width = attention_mask.shape[1]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(requests), num_steps))], dim=1)
        cache = DynamicCache(config=self.model.config)
        hidden = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask[:, :prompt_width],
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
        return attention_mask, position_ids, cache, hidden

    @torch.inference_mode()
    def _generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        device = self.model.device
        num_rows = len(requests)
        rows = sampling.RowSampling.build([r.sampling for r in requests], [r.seed for r in requests], device)
        num_steps = max(r.sampling.max_tokens for r in requests)
        attention_mask, position_ids, cache, hidden = self.prefill_prompts(requests, num_steps)
        prompt_width = attention_mask.shape[1] - num_steps
        positions = torch.arange(num_steps, dtype=torch.int64, device=device)
        keys = sampling.noise_keys(rows.seed_lo[:, None], rows.seed_hi[:, None], positions[None, :])
        builder = _CommitmentBuilder(num_rows, hidden.shape[-1], device)
        step_tokens, step_logprobs, step_margins = [], [], []
        max_tokens = torch.tensor([r.sampling.max_tokens for r in requests], dtype=torch.int64, device=device)
        lengths = torch.zeros(num_rows, dtype=torch.int64, device=device)
        stopped = torch.zeros(num_rows, dtype=torch.bool, device=device)
        finished = torch.zeros(num_rows, dtype=torch.bool, device=device)
        done_check_interval = 1 if device.type == "cpu" else _DONE_CHECK_INTERVAL
        for step in range(num_steps):
            logits = self.lm_head(hidden)
            sampled = sampling.sample(logits, positions[step].expand(num_rows), rows, keys.at_step(step))
            builder.add(step, hidden)
            step_tokens.append(sampled.token_ids)
            step_logprobs.append(sampled.logprobs)
            step_margins.append(sampled.margins)
            is_stop = torch.isin(sampled.token_ids, self.stop_token_ids)
            active = ~finished
            lengths = torch.where(active, step + 1, lengths)
            stopped |= active & is_stop
            finished |= is_stop | (max_tokens == step + 1)
            last_step = step + 1 == num_steps or ((step + 1) % done_check_interval == 0 and bool(finished.all()))
            if (step + 1) % commitment.CHUNK_TOKENS == 0 or last_step:
                builder.close_chunks(step + 1, lengths)
            if last_step:
                break
            position_ids = position_ids[:, -1:] + 1
            hidden = self.decoder(
                input_ids=sampled.token_ids[:, None],
                attention_mask=attention_mask[:, : prompt_width + step + 1],
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state[:, -1]
        tokens = torch.stack(step_tokens, dim=1).cpu().tolist()
        logprobs = torch.stack(step_logprobs, dim=1).cpu().tolist()
        margins = torch.stack(step_margins, dim=1).cpu().tolist()
        commitments = builder.proofs(num_rows)
        return [
            GenerationResult(
                token_ids=tuple(tokens[row][:length]),
                logprobs=tuple(logprobs[row][:length]),
                margins=tuple(margins[row][:length]),
                finish_reason=FinishReason.STOP if is_stopped else FinishReason.LENGTH,
                commitment=commitments[row],
            )
            for row, (length, is_stopped) in enumerate(zip(lengths.tolist(), stopped.tolist(), strict=True))
        ]
