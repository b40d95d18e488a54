"""Weight codec benchmark: delta and keyframe sizes under real AdamW steps, and apply time.

A trainer keeps fp32 master weights and publishes their bf16 rounding, so a published bf16
weight changes only when its fp32 master crosses a rounding boundary. This script does
exactly that: AdamW steps on fp32 Qwen2 models (a policy-gradient loss on random tokens with
random group-normalised advantages, the gradient scale of the real loss), and after every
step the delta between consecutive bf16 states. Baselines, measured in the same run:
raw bf16 bytes, a plain XOR-of-states + zstd coding, and loading the full checkpoint from
safetensors into the model.

Headline figures (last lines): median over steps 10-30 on the largest model run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.policy_sync import DEFAULT_FULL_CHECK_INTERVAL  # noqa: E402
from policy.weights import NodePolicy, bf16_tensor, export_bf16_state  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.manifest import (  # noqa: E402
    PolicyUpdate,
    build_delta,
    build_keyframe,
    sign_manifest,
    signed_manifest_to_bytes,
)

RUN = "bench"
TRAINER = Identity.from_seed(bytes(32))
HEADLINE_FIRST_STEP = 10
HEADLINE_LAST_STEP = 30


@dataclass(frozen=True)
class ModelSize:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int


SMALL = ModelSize(
    "small", vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4, num_kv_heads=2
)
LARGE = ModelSize(
    "large", vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=4
)


def build_model(size: ModelSize, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


def policy_gradient_step(model, optimizer, vocab_size: int, *, num_groups: int, group_size: int, seq_len: int) -> None:
    tokens = torch.randint(0, vocab_size, (num_groups * group_size, seq_len)).to(model.device)
    rewards = torch.randn(num_groups, group_size).to(model.device)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).reshape(-1, 1)
    logits = model(tokens).logits[:, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    loss = -(advantages * logprobs).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def raw_bytes(state) -> int:
    return sum(2 * bits.size for bits in state.values())


def xor_zstd_bytes(base, new) -> int:
    compressor = zstandard.ZstdCompressor(level=3)
    return sum(len(compressor.compress(np.bitwise_xor(base[name], new[name]).tobytes())) for name in sorted(new))


def update_bytes(update) -> int:
    """What a node downloads for an update: its blobs and its signed manifest."""
    signed = signed_manifest_to_bytes(sign_manifest(TRAINER, update.manifest))
    return sum(ref.size for ref in update.manifest.blobs) + len(signed)


@dataclass
class DeltaRun:
    ratios: list[float]
    fractions: list[float]
    baseline_ratios: list[float]
    last_base: dict
    last_update: PolicyUpdate | None


def run_steps(size: ModelSize, lr: float, num_steps: int, batch: dict, device: torch.device) -> DeltaRun:
    model = build_model(size, seed=0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    previous = export_bf16_state(model)
    num_weights = raw_bytes(previous) // 2
    run = DeltaRun([], [], [], previous, None)
    print(f"[{size.name} lr={lr:g}] {num_weights / 1e6:.1f}M parameters, {num_steps} AdamW steps")
    print(f"{'step':>5} {'delta/ckpt':>11} {'changed':>9} {'xor+zstd/ckpt':>14}")
    for step in range(1, num_steps + 1):
        policy_gradient_step(model, optimizer, size.vocab_size, **batch)
        current = export_bf16_state(model)
        previous_hash = None if run.last_update is None else run.last_update.manifest.state_hash
        update = build_delta(RUN, step, step - 1, previous, current, base_state_hash=previous_hash)
        num_changed = sum(int(np.count_nonzero(previous[name] != current[name])) for name in current)
        run.ratios.append(update_bytes(update) / (2 * num_weights))
        run.fractions.append(num_changed / num_weights)
        run.baseline_ratios.append(xor_zstd_bytes(previous, current) / (2 * num_weights))
        print(f"{step:>5} {run.ratios[-1]:>11.4%} {run.fractions[-1]:>9.4%} {run.baseline_ratios[-1]:>14.4%}")
        run.last_base, run.last_update = previous, update
        previous = current
    return run


def headline(values: list[float]) -> float:
    return statistics.median(values[HEADLINE_FIRST_STEP - 1 : HEADLINE_LAST_STEP])


def best_seconds(action, num_repeats: int, before=None, synchronize=lambda: None) -> float:
    """The fastest of `num_repeats` runs: the least disturbed by other load on the machine."""
    times = []
    for _ in range(num_repeats):
        if before is not None:
            before()
        synchronize()
        start = time.perf_counter()
        action()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_apply(size: ModelSize, run: DeltaRun, num_repeats: int, device: torch.device) -> tuple[float, float, float]:
    """Seconds to apply the run's last delta in place, to load the full checkpoint from
    safetensors, and to rehash the node's full state (which a node does every
    DEFAULT_FULL_CHECK_INTERVAL deltas, not on each), with the node's model on `device`."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = build_model(size, seed=1).to(device)
    update = run.last_update
    assert update is not None
    signed = sign_manifest(TRAINER, update.manifest)
    blobs = {ref.hash: blob for ref, blob in zip(update.manifest.blobs, update.blobs, strict=True)}
    node = NodePolicy(model, run_id=RUN, trainer_public_key=TRAINER.public_key)
    base_version = update.manifest.base_version

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.safetensors"
        save_file({name: bf16_tensor(bits) for name, bits in run.last_base.items()}, str(path))
        parameters = dict(model.named_parameters())

        def load_checkpoint() -> None:
            loaded = load_file(str(path), device=str(device))
            with torch.no_grad():
                for name, tensor in loaded.items():
                    parameters[name].copy_(tensor)

        load_checkpoint()
        load_seconds = best_seconds(load_checkpoint, num_repeats, synchronize=synchronize)
    apply_seconds = best_seconds(
        lambda: node.apply(signed, blobs),
        num_repeats,
        before=lambda: node.adopt(base_version, run.last_base),
        synchronize=synchronize,
    )
    hash_seconds = best_seconds(node.check_state_hash, num_repeats)
    return apply_seconds, load_seconds, hash_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model only, fewer steps (< 1 minute)")
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N: where the optimizer steps run and the node's model lives"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    # One intra-op thread: on a shared machine, torch's spinning worker threads can make a
    # plain checkpoint copy 30x slower, which would flatter the apply ratio.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.quick:
        sizes, num_steps = [SMALL], 12
        batch = {"num_groups": 1, "group_size": 4, "seq_len": 16}
    else:
        sizes, num_steps = [SMALL, LARGE], HEADLINE_LAST_STEP
        batch = {"num_groups": 2, "group_size": 4, "seq_len": 64}

    results = {}
    for size in sizes:
        for lr in (1e-6, 1e-5):
            results[(size.name, lr)] = run_steps(size, lr, num_steps, batch, device)

    headline_size = sizes[-1]
    model = build_model(headline_size, seed=0)
    state = export_bf16_state(model)
    keyframe = build_keyframe(RUN, 0, state)
    keyframe_ratio = update_bytes(keyframe) / raw_bytes(state)
    apply_seconds, load_seconds, hash_seconds = measure_apply(
        headline_size, results[(headline_size.name, 1e-6)], 5, device
    )

    print()
    print(f"steps {HEADLINE_FIRST_STEP}-{min(num_steps, HEADLINE_LAST_STEP)}, medians:")
    for (name, lr), run in results.items():
        print(
            f"  {name:>5} lr={lr:g}: delta/ckpt {headline(run.ratios):.4%}, changed {headline(run.fractions):.4%}, "
            f"xor+zstd/ckpt {headline(run.baseline_ratios):.4%}"
        )
    print(
        f"[{headline_size.name}] apply delta in place {apply_seconds * 1000:.1f} ms; "
        f"load full checkpoint from safetensors {load_seconds * 1000:.1f} ms; full-state hash check "
        f"{hash_seconds * 1000:.1f} ms, run every {DEFAULT_FULL_CHECK_INTERVAL} deltas "
        f"(apply with it amortized: {(apply_seconds + hash_seconds / DEFAULT_FULL_CHECK_INTERVAL) / load_seconds:.3f}"
        " of a load)"
    )
    print(f"headline model: {headline_size.name}; node model on {device}")
    print(f"delta-ratio-lr1e-6: {headline(results[(headline_size.name, 1e-6)].ratios):.4%} (target: <= 1%)")
    print(f"delta-ratio-lr1e-5: {headline(results[(headline_size.name, 1e-5)].ratios):.4%} (target: none)")
    print(f"keyframe-ratio: {keyframe_ratio:.3f} (target: <= 0.8)")
    print(f"apply-ratio: {apply_seconds / load_seconds:.3f} (target: <= 0.2)")


if __name__ == "__main__":
    main()
