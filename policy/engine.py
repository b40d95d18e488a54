"""Generation engines: the interface nodes use, and the torch engine (CPU or CUDA).

An engine turns requests (prompt tokens, sampling parameters, a per-sample seed from
protocol.sampling.derive_sample_seed) into completions that follow the seeded sampling rule, with
per-token log-probabilities under the sampling distribution, near-tie margins, the finish reason
and the activation commitment. Completion token j is sampled at rule position j.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from policy import sampling
from protocol import commitment
from protocol.types import FinishReason, SamplingParams

DEFAULT_MAX_BATCH_SIZE = 32
_INDEX_BITS = 32  # top-k keys: magnitude bits above the (complemented) flat index


class EngineRequestError(ValueError):
    """A generation request the engine cannot serve."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    seed: int


@dataclass(frozen=True)
class GenerationResult:
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    margins: tuple[float, ...]  # best minus second-best perturbed score at each token
    finish_reason: FinishReason
    commitment: bytes


@runtime_checkable
class GenerationEngine(Protocol):
    name: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in order."""
        ...


def bf16_bits(hidden: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns of hidden states as int32 in [0, 65535]."""
    return hidden.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF


def chunk_points(chunk_bits: torch.Tensor, num_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-magnitude points of flattened chunks [rows, n] (ties: lower index), as the numpy
    reference protocol.commitment.top_indices selects them: (indices, bf16 bits), [rows, k]."""
    flat_size = chunk_bits.shape[1]
    if flat_size > 2**_INDEX_BITS:
        raise EngineRequestError(f"a commitment chunk of {flat_size} values is too large")
    index = torch.arange(flat_size, dtype=torch.int64, device=chunk_bits.device)
    keys = ((chunk_bits & commitment.BF16_MAGNITUDE_MASK).to(torch.int64) << _INDEX_BITS) | (
        2**_INDEX_BITS - 1 - index)
    indices = keys.topk(num_points, dim=1, sorted=False).indices
    values = chunk_bits.gather(1, indices)
    return indices.cpu().numpy(), values.cpu().numpy()


def chunk_proofs(chunk_bits: torch.Tensor) -> list[bytes]:
    """Proof bytes for rows of flattened chunk states (bf16 bits, int32 [rows, n])."""
    indices, values = chunk_points(chunk_bits, min(commitment.TOP_K, chunk_bits.shape[1]))
    return commitment.proofs_from_points(indices, values)


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids for left-padded sequences."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.int64)
    for row, tokens in enumerate(sequences):
        if tokens:
            input_ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.int64)
            attention_mask[row, width - len(tokens):] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


class _CommitmentBuilder:
    """Final hidden states of the current chunk of every row; proofs as chunks complete."""

    def __init__(self, num_rows: int, hidden_size: int, device: torch.device):
        self.buffer = torch.zeros((num_rows, commitment.CHUNK_TOKENS, hidden_size),
                                  dtype=torch.int32, device=device)
        self.proofs: list[list[bytes]] = [[] for _ in range(num_rows)]

    def add(self, step: int, hidden: torch.Tensor) -> None:
        self.buffer[:, step % commitment.CHUNK_TOKENS] = bf16_bits(hidden)

    def close_chunks(self, rows: Sequence[int], num_tokens: int) -> None:
        """Rows whose chunk ends with their num_tokens-th token (the same count for all rows)."""
        if not rows:
            return
        filled = num_tokens - (num_tokens - 1) // commitment.CHUNK_TOKENS * commitment.CHUNK_TOKENS
        row_index = torch.tensor(rows, dtype=torch.int64, device=self.buffer.device)
        chunks = self.buffer[row_index, :filled].reshape(len(rows), -1)
        for row, proof in zip(rows, chunk_proofs(chunks)):
            self.proofs[row].append(proof)


class TorchEngine:
    """Batched, KV-cached, left-padded generation with a Hugging Face causal LM whose logits are
    its output embeddings applied to its decoder's final hidden states."""

    name = "torch"

    def __init__(self, model: PreTrainedModel, stop_token_ids: Collection[int],
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, pad_token_id: int = 0):
        if max_batch_size < 1:
            raise EngineRequestError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.stop_token_ids = torch.tensor(sorted(stop_token_ids), dtype=torch.int64,
                                           device=model.device)
        self.max_batch_size = max_batch_size
        self.pad_token_id = pad_token_id

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        for request in requests:
            if not request.prompt_token_ids:
                raise EngineRequestError("a prompt needs at least one token")
            if request.sampling.max_tokens < 1:
                raise EngineRequestError(f"max_tokens must be >= 1, got {request.sampling.max_tokens}")
        results: list[GenerationResult] = []
        for start in range(0, len(requests), self.max_batch_size):
            results.extend(self._generate_batch(requests[start:start + self.max_batch_size]))
        return results

    @torch.inference_mode()
    def _generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        device = self.model.device
        num_rows = len(requests)
        rows = sampling.RowSampling.build([r.sampling for r in requests],
                                          [r.seed for r in requests], device)
        max_tokens = [r.sampling.max_tokens for r in requests]
        input_ids, attention_mask, position_ids = left_pad(
            [r.prompt_token_ids for r in requests], self.pad_token_id, device)
        num_steps = max(max_tokens)
        prompt_width = attention_mask.shape[1]
        attention_mask = torch.cat(
            [attention_mask, attention_mask.new_ones((num_rows, num_steps))], dim=1)
        positions = torch.arange(num_steps, dtype=torch.int64, device=device)
        cache = DynamicCache(config=self.model.config)
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask[:, :prompt_width],
                              position_ids=position_ids, past_key_values=cache,
                              use_cache=True).last_hidden_state[:, -1]
        builder = _CommitmentBuilder(num_rows, hidden.shape[-1], device)
        step_tokens, step_logprobs, step_margins = [], [], []
        lengths = [0] * num_rows
        stopped = [False] * num_rows
        active = list(range(num_rows))
        for step in range(num_steps):
            logits = self.lm_head(hidden)
            sampled = sampling.sample(logits, positions[step].expand(num_rows), rows)
            builder.add(step, hidden)
            step_tokens.append(sampled.token_ids)
            step_logprobs.append(sampled.logprobs)
            step_margins.append(sampled.margins)
            is_stop = torch.isin(sampled.token_ids, self.stop_token_ids).tolist()
            closing, still_active = [], []
            for row in active:
                lengths[row] = step + 1
                stopped[row] = is_stop[row]
                done = is_stop[row] or step + 1 == max_tokens[row]
                if done or (step + 1) % commitment.CHUNK_TOKENS == 0:
                    closing.append(row)
                if not done:
                    still_active.append(row)
            builder.close_chunks(closing, step + 1)
            active = still_active
            if not active:
                break
            position_ids = position_ids[:, -1:] + 1
            hidden = self.decoder(input_ids=sampled.token_ids[:, None],
                                  attention_mask=attention_mask[:, :prompt_width + step + 1],
                                  position_ids=position_ids, past_key_values=cache,
                                  use_cache=True).last_hidden_state[:, -1]
        tokens = torch.stack(step_tokens, dim=1).cpu().tolist()
        logprobs = torch.stack(step_logprobs, dim=1).cpu().tolist()
        margins = torch.stack(step_margins, dim=1).cpu().tolist()
        return [
            GenerationResult(
                token_ids=tuple(tokens[row][:lengths[row]]),
                logprobs=tuple(logprobs[row][:lengths[row]]),
                margins=tuple(margins[row][:lengths[row]]),
                finish_reason=FinishReason.STOP if stopped[row] else FinishReason.LENGTH,
                commitment=b"".join(builder.proofs[row]),
            )
            for row in range(num_rows)
        ]
