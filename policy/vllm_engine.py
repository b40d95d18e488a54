"""The vLLM generation engine: vLLM schedules, batches and runs the model; the protocol's seeded
sampling rule picks every token (policy/engine.py describes the engine interface).

How the rule gets inside vLLM (0.32, V1 engine, run in this process):

* A custom logits processor (`vllm.v1.sample.logits_processor.LogitsProcessor`) sees each step's
  logits of the whole persistent batch. It runs policy.sampling.sample on them with the seed and
  sampling parameters its request carries (in `SamplingParams.extra_args`) at position
  len(output tokens), records the token, log-probability and margin, and returns logits that are
  -inf everywhere but at that token. vLLM's requests are greedy, so vLLM emits exactly that token.
  The rule's noise keys of every position a request may sample are hashed once, at its first step
  (with those of the other requests that joined the batch then); each step gathers them.
* The model's `compute_logits` is wrapped to record the hidden states the logits come from: the
  decoder's final hidden states at the sampled positions, the tensors the commitment is defined
  on. They are kept as bf16 until generate() returns and builds the commitments.
* A sample vLLM computed and then discarded (a partly prefilled prompt, a preempted request that
  is recomputed) is overwritten by the one at the same position that counts: per request and
  position the last record wins, and the tokens recorded are checked against vLLM's output.
* Weights follow the node's policy (`follow`): when its version moved, the engine checks the
  state's hash and reloads the whole state into the live model with vLLM's in-place
  `reload_weights` (which also redoes CPU weight packing), then resets the prefix cache.

vLLM must run its engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, one worker,
no tensor parallelism): the processor's records and the live model are reached directly.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from policy import sampling
from policy.engine import (
    EngineRequestError,
    GenerationRequest,
    GenerationResult,
    bf16_bits,
    check_requests,
    chunk_points,
)
from policy.model import ModelLoadError, check_model_directory, torch_dtype
from policy.weights import bf16_tensor
from protocol import commitment
from protocol.codec import BF16State
from protocol.types import FinishReason, SamplingParams

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
REQUEST_KEY = "rollproof"  # SamplingParams.extra_args entry of a request's key, seed and rule parameters


class FollowedPolicy(Protocol):
    """What the engine needs of the node's policy (policy.weights.NodePolicy)."""

    @property
    def version(self) -> int | None: ...

    @property
    def state(self) -> BF16State | None: ...

    def check_state_hash(self) -> None: ...


@dataclass
class _Row:
    key: int
    seed: int
    params: SamplingParams
    output_token_ids: list[int]  # vLLM's live list of the request's output tokens
    noise_keys: sampling.NoiseKeys | None = None  # at positions 0 .. max_tokens - 1, int64 [max_tokens]


@dataclass(frozen=True)
class _Step:
    """One application of the rule: a row per request in the batch."""

    keys: list[int]
    positions: list[int]
    sampled: sampling.SampledTokens
    hidden: torch.Tensor  # bf16 [rows, hidden_size]


class _Recorder:
    """Where the logits processor and the compute_logits wrapper leave what they saw."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None  # final hidden states behind the latest logits
        self.steps: list[_Step] = []


class _SeededRuleProcessor:
    """Mixin body of the logits processor class `_processor_class` builds for one engine."""

    recorder: _Recorder

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rows: dict[int, _Row] = {}
        # Of the batch as it is now, rebuilt after every change: the rows' parameters and seeds, and
        # their noise keys at every position, [rows, the longest max_tokens].
        self.row_sampling: sampling.RowSampling | None = None
        self.row_noise_keys: sampling.NoiseKeys | None = None

    @classmethod
    def validate_params(cls, params: Any) -> None:
        if not params.extra_args or REQUEST_KEY not in params.extra_args:
            raise ValueError(f"a request to this engine carries its seed in extra_args[{REQUEST_KEY!r}]")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: Any) -> None:
        if batch_update is None:
            return
        from vllm.v1.sample.logits_processor import MoveDirectionality

        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _, output_token_ids in batch_update.added:
            key, seed, temperature, top_k, top_p = params.extra_args[REQUEST_KEY]
            self.rows[index] = _Row(
                key, seed, SamplingParams(temperature, top_k, top_p, params.max_tokens), output_token_ids
            )
        for source, target, direction in batch_update.moved:
            moving = self.rows.pop(source, None)
            if direction == MoveDirectionality.SWAP:
                displaced = self.rows.pop(target, None)
                if displaced is not None:
                    self.rows[source] = displaced
            if moving is not None:
                self.rows[target] = moving
        self.row_sampling = self.row_noise_keys = None

    def _batch_sampling(self, rows: Sequence[_Row]) -> tuple[sampling.RowSampling, sampling.NoiseKeys]:
        """The batch's parameters and noise keys; the keys of rows that joined since the last change
        are hashed first, together."""
        if self.row_sampling is None or self.row_noise_keys is None:
            self.row_sampling = sampling.RowSampling.build(
                [r.params for r in rows], [r.seed for r in rows], self.device
            )
            joined = [i for i, r in enumerate(rows) if r.noise_keys is None]
            if joined:
                at = torch.tensor(joined, dtype=torch.int64, device=self.device)
                positions = torch.arange(max(rows[i].params.max_tokens for i in joined), device=self.device)
                keys = sampling.noise_keys(
                    self.row_sampling.seed_lo[at, None], self.row_sampling.seed_hi[at, None], positions[None, :]
                )
                for row, i in enumerate(joined):
                    length = rows[i].params.max_tokens
                    rows[i].noise_keys = sampling.NoiseKeys(keys.key0[row, :length], keys.key1[row, :length])
            row_keys = [r.noise_keys for r in rows if r.noise_keys is not None]
            assert len(row_keys) == len(rows), "a row without its noise keys"
            self.row_noise_keys = sampling.NoiseKeys(
                torch.nn.utils.rnn.pad_sequence([k.key0 for k in row_keys], batch_first=True),
                torch.nn.utils.rnn.pad_sequence([k.key1 for k in row_keys], batch_first=True),
            )
        return self.row_sampling, self.row_noise_keys

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        recorder = self.recorder
        hidden, recorder.hidden = recorder.hidden, None
        num_rows = logits.shape[0]
        assert hidden is not None and hidden.shape[0] == num_rows, "logits without their hidden states"
        rows = [self.rows[index] for index in range(num_rows)]
        row_sampling, row_noise_keys = self._batch_sampling(rows)
        positions = [len(r.output_token_ids) for r in rows]
        assert all(p < r.params.max_tokens for p, r in zip(positions, rows, strict=True)), "a sample past max_tokens"
        at = torch.tensor(positions, dtype=torch.int64, device=logits.device)[:, None]
        keys = sampling.NoiseKeys(row_noise_keys.key0.gather(1, at)[:, 0], row_noise_keys.key1.gather(1, at)[:, 0])
        sampled = sampling.sample(logits, at[:, 0], row_sampling, keys)
        recorder.steps.append(_Step([r.key for r in rows], positions, sampled, hidden.to(torch.bfloat16)))
        # vLLM's greedy sampling then emits the rule's token; the logits are the processor's to overwrite.
        return logits.fill_(-torch.inf).scatter_(1, sampled.token_ids[:, None], 0.0)


def _processor_class(recorder: _Recorder) -> type:
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return type("SeededRuleProcessor", (_SeededRuleProcessor, LogitsProcessor), {"recorder": recorder})


def _record_hidden_states(model: Any, recorder: _Recorder) -> None:
    compute_logits = model.compute_logits

    def recording_compute_logits(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        recorder.hidden = hidden_states
        return compute_logits(hidden_states, *args, **kwargs)

    model.compute_logits = recording_compute_logits


def _repack_tied_output_embeddings(model: Any) -> None:
    """vLLM's in-place reload skips a tied lm_head (its weight is the input embeddings', reloaded
    in place), but on CPU the lm_head multiplies with a packed copy made from that weight when it
    was loaded: make it again. (Elsewhere this processing does nothing.)"""
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and getattr(model.config, "tie_word_embeddings", False):
        lm_head.quant_method.process_weights_after_loading(lm_head)


def policy_skeleton(model_dir: Path, dtype: str) -> torch.nn.Module:
    """The Hugging Face model of `model_dir` on the meta device: the parameter names, shapes and
    dtype of the policy state, without memory. The node's policy (NodePolicy) tracks the state
    against it; the weights themselves live in vLLM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))


class VllmEngine:
    """Generation with vLLM under the seeded sampling rule, with the torch engine's results."""

    name = "vllm"

    def __init__(
        self,
        model_dir: Path,
        stop_token_ids: Collection[int],
        *,
        max_batch_size: int = 32,
        dtype: str = "float32",
        device: str = "cpu",
        kv_cache_bytes: int | None = None,
        seed: int = 0,
    ):
        if max_batch_size < 1:
            raise EngineRequestError(f"max_batch_size must be >= 1, got {max_batch_size}")
        model_dir = Path(model_dir).expanduser()
        check_model_directory(model_dir)
        # Before vLLM reads its settings: the engine core in this process, and on CPU no
        # OpenMP core binding (the node sets torch's thread count itself).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM
        from vllm.platforms import current_platform

        if device.split(":")[0] != current_platform.device_type:
            raise ModelLoadError(
                f"this vLLM build runs on {current_platform.device_type!r}, not {device!r}; "
                "install the vLLM build for that device or change engine.device"
            )
        on_cpu = current_platform.device_type == "cpu"
        if kv_cache_bytes is None and on_cpu:
            kv_cache_bytes = DEFAULT_CPU_KV_CACHE_BYTES
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_batch_size = max_batch_size
        self._recorder = _Recorder()
        self._keys = itertools.count()
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for its core binding,
        # which is off here; keep the real one for the rest of the process.
        set_num_threads = torch.set_num_threads
        try:
            self.llm = LLM(
                model=str(model_dir),
                skip_tokenizer_init=True,
                dtype=dtype,
                seed=seed,
                max_num_seqs=max_batch_size,
                logits_processors=[_processor_class(self._recorder)],
                kv_cache_memory_bytes=kv_cache_bytes,
                enforce_eager=on_cpu,
                async_scheduling=False,
                disable_log_stats=True,
            )
        finally:
            torch.set_num_threads = set_num_threads
        self.llm.apply_model(lambda model: _record_hidden_states(model, self._recorder))
        self.max_model_len = self.llm.llm_engine.vllm_config.model_config.max_model_len
        self.policy_model = policy_skeleton(model_dir, dtype)
        self._policy: FollowedPolicy | None = None
        self._loaded_version: int | None = None

    def follow(self, policy: FollowedPolicy) -> None:
        """Generate with `policy`'s weights from now on: each generate() first loads its state
        into the live model when its version changed since the last load."""
        self._policy = policy

    def load_state(self, state: BF16State) -> None:
        """Reload a whole bf16 state (names as the model's Hugging Face parameters) into the live
        model, in place, and forget every cached prefix computed with the old weights."""
        weights = ((name, bf16_tensor(bits)) for name, bits in state.items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.apply_model(_repack_tied_output_embeddings)
        self.llm.reset_prefix_cache()

    def _follow_policy(self) -> None:
        policy = self._policy
        if policy is None or policy.version is None or policy.version == self._loaded_version:
            return
        assert policy.state is not None, "a policy with a version holds a state"
        policy.check_state_hash()
        self.load_state(policy.state)
        self._loaded_version = policy.version

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        check_requests(requests)
        for request in requests:
            if len(request.prompt_token_ids) + request.sampling.max_tokens > self.max_model_len:
                raise EngineRequestError(
                    f"a prompt of {len(request.prompt_token_ids)} tokens and max_tokens "
                    f"{request.sampling.max_tokens} exceed the model's {self.max_model_len} positions"
                )
        if not requests:
            return []
        sampling.RowSampling.build([r.sampling for r in requests], [r.seed for r in requests], "cpu")  # validates
        self._follow_policy()
        keys = [next(self._keys) for _ in requests]
        params = [
            VllmSamplingParams(
                temperature=0.0,
                max_tokens=r.sampling.max_tokens,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=True,
                detokenize=False,
                extra_args={REQUEST_KEY: (key, r.seed, r.sampling.temperature, r.sampling.top_k, r.sampling.top_p)},
            )
            for key, r in zip(keys, requests, strict=True)
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)) for r in requests]
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            return self._results(keys, [output.outputs[0] for output in outputs])
        finally:
            self._recorder.steps.clear()

    def _results(self, keys: Sequence[int], completions: Sequence[Any]) -> list[GenerationResult]:
        steps = self._recorder.steps
        token_ids = torch.cat([s.sampled.token_ids for s in steps]).tolist()
        logprobs = torch.cat([s.sampled.logprobs for s in steps]).tolist()
        margins = torch.cat([s.sampled.margins for s in steps]).tolist()
        hidden = torch.cat([s.hidden for s in steps])
        record = {}  # (key, position) -> flat row; later samples at a position replace discarded ones
        for row, key_position in enumerate(
            itertools.chain.from_iterable(zip(s.keys, s.positions, strict=True) for s in steps)
        ):
            record[key_position] = row
        rows = [
            [record[key, position] for position in range(len(completion.token_ids))]
            for key, completion in zip(keys, completions, strict=True)
        ]
        for row_list, completion in zip(rows, completions, strict=True):
            assert [token_ids[row] for row in row_list] == list(completion.token_ids), (
                "vLLM emitted a token the rule did not choose"
            )
        proofs = _commitment_proofs([hidden[torch.tensor(row_list, device=hidden.device)] for row_list in rows])
        return [
            GenerationResult(
                token_ids=tuple(completion.token_ids),
                logprobs=tuple(logprobs[row] for row in row_list),
                margins=tuple(margins[row] for row in row_list),
                finish_reason=FinishReason.STOP if completion.finish_reason == "stop" else FinishReason.LENGTH,
                commitment=b"".join(request_proofs),
            )
            for row_list, completion, request_proofs in zip(rows, completions, proofs, strict=True)
        ]


def _commitment_proofs(hidden_states: Sequence[torch.Tensor]) -> list[list[bytes]]:
    """Chunk proofs of each completion's final hidden states ([num_tokens, hidden_size]); chunks
    of the same length are proven together."""
    chunks: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for index, hidden in enumerate(hidden_states):
        for start, end in commitment.chunk_bounds(hidden.shape[0]):
            chunks.setdefault(end - start, []).append((index, hidden[start:end].reshape(-1)))
    proofs: list[list[bytes]] = [[] for _ in hidden_states]
    for _, same_length in sorted(chunks.items(), reverse=True):  # full chunks before a last, shorter one
        bits = bf16_bits(torch.stack([chunk for _, chunk in same_length]))
        indices, values = chunk_points(bits, min(commitment.TOP_K, bits.shape[1]))
        for (index, _), proof in zip(
            same_length, commitment.proofs_from_points(indices.cpu().numpy(), values.cpu().numpy()), strict=True
        ):
            proofs[index].append(proof)
    return proofs
