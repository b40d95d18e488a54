"""vLLM engine throughput: the seeded rule and commitments inside vLLM against vLLM's own sampling.

Same model, batch, prompts and lengths (no stop token: every sample runs to max_tokens) for three
generators: the vLLM engine (policy/vllm_engine.py: the rule in a logits processor, hidden states
recorded, commitments built), plain vLLM (its own unseeded sampling at temperature 1, nothing
recorded, a separate LLM without the processor) and the torch engine. `print_vllm_throughput` is
the part bench/engine.py runs when vLLM is installed; run alone, this script builds that bench's
model. Prints, last: vllm-throughput-ratio (rule + commitments / vLLM's own sampling).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policy.engine import GenerationRequest  # noqa: E402


@dataclass(frozen=True)
class VllmThroughput:
    engine_tokens_per_s: float  # vLLM engine: seeded rule + commitments
    vllm_tokens_per_s: float  # vLLM's own sampling, nothing recorded

    @property
    def ratio(self) -> float:
        return self.engine_tokens_per_s / self.vllm_tokens_per_s


def measure_vllm_throughput(
    model: torch.nn.Module, requests: Sequence[GenerationRequest], repeats: int
) -> VllmThroughput:
    """Best-of-`repeats` tokens/s of the vLLM engine and of plain vLLM on `requests` (one batch,
    no stop tokens), `model` saved to a temporary directory and loaded by both in float32."""
    from engine import best_times
    from vllm import LLM
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.inputs import TokensPrompt

    from policy.vllm_engine import DEFAULT_CPU_KV_CACHE_BYTES, VllmEngine

    batch_size = len(requests)
    max_tokens = requests[0].sampling.max_tokens
    with tempfile.TemporaryDirectory() as model_dir:
        model.save_pretrained(model_dir)
        engine = VllmEngine(Path(model_dir), stop_token_ids=(), max_batch_size=batch_size)
        on_cpu = engine.llm.llm_engine.vllm_config.device_config.device_type == "cpu"
        plain = LLM(
            model=model_dir,
            skip_tokenizer_init=True,
            dtype="float32",
            seed=0,
            max_num_seqs=batch_size,
            kv_cache_memory_bytes=DEFAULT_CPU_KV_CACHE_BYTES if on_cpu else None,
            enforce_eager=on_cpu,
            async_scheduling=False,
            disable_log_stats=True,
        )
    prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)) for r in requests]
    own_sampling = VllmSamplingParams(
        temperature=1.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, detokenize=False
    )

    def plain_generate() -> None:
        outputs = plain.generate(prompts, own_sampling, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)

    def engine_generate() -> None:
        assert all(len(r.token_ids) == max_tokens for r in engine.generate(requests))

    engine_generate()
    plain_generate()
    seconds = best_times({"engine": engine_generate, "plain": plain_generate}, repeats)
    num_tokens = batch_size * max_tokens
    return VllmThroughput(num_tokens / seconds["engine"], num_tokens / seconds["plain"])


def print_vllm_throughput(
    model: torch.nn.Module, requests: Sequence[GenerationRequest], torch_engine_seconds: float, repeats: int
) -> None:
    """The vLLM lines of bench/engine.py (`vllm-throughput-ratio` last); nothing without vLLM."""
    if importlib.util.find_spec("vllm") is None:
        return
    measured = measure_vllm_throughput(model, requests, repeats)
    torch_tokens_per_s = len(requests) * requests[0].sampling.max_tokens / torch_engine_seconds
    print(f"vllm engine (seeded rule + commitments): {measured.engine_tokens_per_s:,.0f} tokens/s")
    print(f"vllm (own sampling, no commitments): {measured.vllm_tokens_per_s:,.0f} tokens/s")
    print(f"vllm-engine-vs-torch-engine: {measured.engine_tokens_per_s / torch_tokens_per_s:.3f}")
    print(f"vllm-throughput-ratio: {measured.ratio:.3f} (target: >= 0.9)")


def main() -> None:
    import numpy as np
    from engine import best_times, build_model

    from policy.engine import TorchEngine
    from protocol import sampling as rule
    from protocol.types import SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for all (1 is steadiest)")
    args = parser.parse_args()
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("vLLM is not installed here: see docs/operations.md#the-vllm-engine for its install")
    torch.set_num_threads(args.threads)
    batch_size = args.batch_size or (8 if args.quick else 32)
    max_tokens = args.max_tokens or (32 if args.quick else 128)
    repeats = args.repeats or (5 if args.quick else 3)
    model = build_model(hidden_size=256, num_layers=4, vocab_size=512)
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens)
    requests = [
        GenerationRequest(
            tuple(int(t) for t in rng.integers(2, 512, rng.integers(8, 24))), params, rule.derive_sample_seed(1, i, 0)
        )
        for i in range(batch_size)
    ]
    torch_engine = TorchEngine(model, stop_token_ids=(), max_batch_size=batch_size)
    torch_engine.generate(requests[:2])
    torch_seconds = best_times({"torch": lambda: torch_engine.generate(requests)}, repeats)["torch"]
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: Qwen2-style, {num_params / 1e6:.1f}M parameters, fp32, {args.threads} threads")
    print(f"batch {batch_size}, {max_tokens} new tokens per sample, best of {repeats}")
    print(f"torch engine (seeded rule + commitments): {batch_size * max_tokens / torch_seconds:,.0f} tokens/s")
    print_vllm_throughput(model, requests, torch_seconds, repeats)


if __name__ == "__main__":
    main()
