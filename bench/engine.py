"""Torch engine throughput against `transformers` generate, and the validator's replay cost.

Same random-init Qwen2-style model, batch, prompt lengths and completion lengths (no stop token, so
every sample runs to max_tokens) for both. The engine samples by the seeded rule and builds
activation commitments; the baseline is plain `generate(do_sample=True)`. The validator replays
every engine rollout: one batched prefill, the token-by-token rule check, the log-probability
drift and the commitment verification, all batched over the rollouts.

Prints, last: throughput-ratio-vs-hf-generate and prefill-cost-ratio (validator replay cost per
rollout / generation cost per rollout).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from engine_vllm import print_vllm_throughput
from transformers import Qwen2Config, Qwen2ForCausalLM

from policy.engine import GenerationRequest, TorchEngine
from policy.prefill import ClaimedRollout, prefill, replay
from protocol import commitment
from protocol import sampling as rule
from protocol.types import SamplingParams


def build_model(hidden_size: int, num_layers: int, vocab_size: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 64),
        num_key_value_heads=max(1, hidden_size // 128),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.1,
    )
    return Qwen2ForCausalLM(config).eval()


def forward_flops(model: Qwen2ForCausalLM, num_positions: int, num_logit_rows: int) -> float:
    """Matmul FLOPs of a forward pass: 2 per weight of the decoder layers per position, and of the
    output embeddings per row of logits (attention scores are negligible at these lengths)."""
    layer_weights = sum(p.numel() for p in model.get_decoder().layers.parameters())
    return 2.0 * (layer_weights * num_positions + model.get_output_embeddings().weight.numel() * num_logit_rows)


def best_times(
    runs: dict[str, Callable[[], object]], repeats: int, synchronize: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Fastest of `repeats` runs of each, interleaved so that load changes hit all alike."""
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize()
            start = time.perf_counter()
            run()
            synchronize()
            timings[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for both sides (1 is steadiest on a shared machine)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both sides)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batch_size = args.batch_size or (8 if args.quick else 32)
    max_tokens = args.max_tokens or (32 if args.quick else 128)
    repeats = args.repeats or (2 if args.quick else 3)
    model = build_model(args.hidden_size, args.num_layers, args.vocab_size).to(device, getattr(torch, args.dtype))
    num_params = sum(p.numel() for p in model.parameters())

    rng = np.random.default_rng(0)
    prompts = [tuple(int(t) for t in rng.integers(2, args.vocab_size, rng.integers(8, 24))) for _ in range(batch_size)]
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens)
    requests = [GenerationRequest(p, params, rule.derive_sample_seed(1, i, 0)) for i, p in enumerate(prompts)]
    engine = TorchEngine(model, stop_token_ids=(), max_batch_size=batch_size)

    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([(0,) * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

    def hf_generate() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(
                input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                eos_token_id=None,
                pad_token_id=0,
            )

    hf_generate()
    engine.generate(requests[:2])
    num_tokens = batch_size * max_tokens
    results = engine.generate(requests)
    assert all(len(r.token_ids) == max_tokens for r in results)
    claimed = [
        ClaimedRollout(q.prompt_token_ids, r.token_ids, r.logprobs, r.commitment, q.sampling, q.seed)
        for q, r in zip(requests, results, strict=True)
    ]
    tolerances = rule.tolerances_for(args.dtype)
    thresholds = commitment.thresholds_for(args.dtype)
    seconds = best_times(
        {
            "hf": hf_generate,
            "engine": lambda: engine.generate(requests),
            "prefill": lambda: prefill(model, [(c.prompt_token_ids, c.token_ids) for c in claimed]),
            "replay": lambda: replay(model, claimed, tolerances.logit_tolerance),
        },
        repeats,
        synchronize,
    )
    hf_seconds, engine_seconds = seconds["hf"], seconds["engine"]
    prefill_seconds, replay_seconds = seconds["prefill"], seconds["replay"]
    reports = replay(model, claimed, tolerances.logit_tolerance)
    assert all(r.passes(tolerances.max_logprob_drift, thresholds) for r in reports)

    print(
        f"model: Qwen2-style, {num_params / 1e6:.1f}M parameters, {args.dtype} on {device}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(f"batch {batch_size}, {max_tokens} new tokens per sample, best of {repeats}")
    print(f"hf generate (sampling): {num_tokens / hf_seconds:,.0f} tokens/s")
    print(f"torch engine (seeded rule + commitments): {num_tokens / engine_seconds:,.0f} tokens/s")
    print(f"validator prefill forward only: {prefill_seconds / batch_size * 1e3:.2f} ms/rollout")
    print(
        f"validator replay (prefill + rule + drift + commitment): {replay_seconds / batch_size * 1e3:.2f} "
        f"ms/rollout; generation {engine_seconds / batch_size * 1e3:.2f} ms/rollout"
    )
    # Generation runs prompt + max_tokens - 1 positions per rollout and max_tokens rows of logits; so does
    # the validator's prefill: the same FLOPs, so its cost ratio is bounded by how much faster than
    # decoding a full forward pass runs, not by less work.
    flops = forward_flops(model, sum(len(p) + max_tokens - 1 for p in prompts), num_tokens)
    print(
        f"forward FLOPs: {flops / 1e9:.2f} G for generation and for prefill alike (ratio 1.00); "
        f"achieved: generation {flops / engine_seconds / 1e9:.1f} GFLOP/s, prefill "
        f"{flops / prefill_seconds / 1e9:.1f} GFLOP/s"
    )
    print(f"near-ties tolerated in replay: {sum(r.token_checks.num_near_ties for r in reports)} of {num_tokens}")
    print(f"throughput-ratio-vs-hf-generate: {hf_seconds / engine_seconds:.3f} (target: >= 0.95)")
    print(f"prefill-cost-ratio: {replay_seconds / engine_seconds:.3f} (target: <= 0.1)")
    if device.type == "cpu" and args.dtype == "float32":
        print_vllm_throughput(model, requests, engine_seconds, max(repeats, 5))


if __name__ == "__main__":
    main()
