"""Validation cost (issue 7): validator CPU time per rollout ÷ node generation time per rollout.

One process builds the real coordinator (store, blob store, scheduler, validator) on a temporary
SQLite file with the tiny model published as version 1, plays an honest fp32 node (leases, the
torch engine with seeded sampling and commitments, submissions), then lets the validator fully
check every group: rebuild the policy from the signed update, one batched prefill over the groups
it takes at once (each prompt run once for its group), the token rule, log-prob drift, per-chunk and pooled commitments, termination. The baseline is the
node's own generation time for the same rollouts, measured in the same run. On the CPU both sides
are timed in CPU time of this (single-threaded) process, as the issue defines the figure; wall-clock
figures are printed beside them (equal on an idle machine, inflated alike by other load). With
--device cuda both run on the GPU and the figure is the wall-clock ratio (the CPU mostly waits).

Then the node-level token statistics (coordinator/node_stats.py) of honest nodes: torch nodes in
bf16 (and one in fp32) on the default tiny model (the bootstrapped one when cached, else the untrained
one), at T = 0.7 and 1.0, with and without top-k/top-p, replayed by a validator on SDPA or eager
attention; every group fully checked, its statistics pooled per configuration into windows of
NODE_WINDOW_TOKENS tokens, each window judged by the four node-level tests.

Prints, last: validation-cost-ratio and floor-load-fraction (validation compute as a fraction of
node compute when a node has reached the floor sampling rate), node-test-false-positive-rate (honest
bf16 windows flagged by any node-level test, of those judged) and probation-tokens (the fully checked
tokens a node passes before its groups are trainable).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.node_stats import FALSE_POSITIVE_RATE, NODE_WINDOW_TOKENS  # noqa: E402
from policy.model import TinyModelShape  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer leases (under a minute)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (node and validator)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden-size", type=int, default=TinyModelShape.hidden_size,
                        help="the model's width (the default tiny model's by default; its depth scales along)")
    parser.add_argument("--num-layers", type=int, default=TinyModelShape.num_hidden_layers)
    parser.add_argument("--node-test-tokens", type=int,
                        help="honest tokens per node-test configuration (default: 50,000; with --quick one window "
                             "of two configurations), on the default tiny model warmed up by `rollproof bootstrap` "
                             "(made now if not cached)")
    args = parser.parse_args()

    import torch

    from coordinator.blobstore import BlobStore
    from coordinator.config import CoordinatorConfig
    from coordinator.server import build, load_run_setup, open_coordinator_store
    from node.generate import generate_batch
    from policy.engine import TorchEngine
    from policy.model import create_tiny_model, freeze_long_lived_objects, load_model
    from policy.tokenizer import load_tokenizer
    from policy.weights import export_bf16_state, load_bf16_state
    from protocol import convert
    from protocol.identity import Identity
    from trainer.publish import PolicyPublisher

    torch.set_num_threads(1)
    num_leases = 4 if args.quick else 16
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        shape = TinyModelShape(hidden_size=args.hidden_size, intermediate_size=3 * args.hidden_size,
                               num_hidden_layers=args.num_layers, num_attention_heads=max(4, args.hidden_size // 64))
        create_tiny_model(root / "model", shape=shape)
        trainer = Identity.generate()
        model = load_model(root / "model", dtype=args.dtype, device=args.device)
        freeze_long_lived_objects()  # as the node daemon does once its model is loaded
        blobs = BlobStore(root / "data" / "policy", run_id="demo", trainer_public_key=trainer.public_key)
        PolicyPublisher(trainer, "demo", blobs).publish_model(1, model)
        load_bf16_state(model, export_bf16_state(model))
        config = CoordinatorConfig.model_validate({
            "data_dir": str(root / "data"),
            "trainer_key_fingerprint": trainer.key_id,
            "run": {"model": str(root / "model"), "group_size": 8, "prompts_per_lease": 4,
                    "sampling": {"max_tokens": args.max_tokens}},
            "lease": {"max_open_per_node": num_leases},
            "validation": {"device": args.device},
        })
        setup = load_run_setup(config)
        store = open_coordinator_store(config)
        built = build(config, setup, store)
        app, validator = built.app, built.validator
        node = Identity.generate()
        engine_name = f"torch-{args.device}-{args.dtype}"
        app.register(node.key_id, node.public_key, "bench", engine_name, args.device, "bench")
        tokenizer = load_tokenizer(root / "model")
        engine = TorchEngine(model, stop_token_ids={tokenizer.eos_token_id}, max_batch_size=32)
        generation_s = generation_wall_s = 0.0
        num_rollouts = num_tokens = 0
        for _ in range(num_leases):
            lease = app.lease(node.key_id, 1)
            started, started_wall = time.process_time(), time.perf_counter()
            generated = generate_batch(engine, tokenizer, setup.task, config.run.seed, lease, engine_name)
            generation_s += time.process_time() - started
            generation_wall_s += time.perf_counter() - started_wall
            num_rollouts += sum(len(g.rollouts) for g in generated.batch.groups)
            num_tokens += generated.num_tokens
            result = app.submit(node.key_id, convert.batch_to_proto(generated.batch).SerializeToString())
            assert result.receipt.num_rejected == 0, result.receipt
        validator.run_pending(limit=1)  # loads the validator's model and rebuilds the policy once
        started, started_wall = time.process_time(), time.perf_counter()
        while validator.run_pending(limit=64):
            pass
        validation_s = time.process_time() - started
        validation_wall_s = time.perf_counter() - started_wall
        results = [r for r in store.list_validations(node.key_id, 10_000)]
        store.close()
    assert all(r.passed for r in results), [r.evidence_json for r in results if not r.passed][:2]
    ratio = validation_s / generation_s if args.device == "cpu" else validation_wall_s / generation_wall_s
    floor_rate = config.validation.floor_rate
    print(json.dumps({
        "rollouts": num_rollouts, "tokens": num_tokens, "groups_checked": len(results),
        "generation_ms_per_rollout": round(1000 * generation_s / num_rollouts, 2),
        "validation_ms_per_rollout": round(1000 * validation_s / num_rollouts, 2),
        "wall_clock_ratio": round(validation_wall_s / generation_wall_s, 3),
    }))
    node_tests = measure_node_tests(args.node_test_tokens or (NODE_WINDOW_TOKENS if args.quick else 50_000),
                                    QUICK_NODE_TEST_CONFIGS if args.quick else NODE_TEST_CONFIGS)
    print(json.dumps(node_tests["configs"], indent=1))
    print(f"validation-cost-ratio: {ratio:.3f} (target: <= 0.1)")
    print(f"floor-load-fraction: {floor_rate * ratio:.4f} (validation compute ÷ node compute at the {floor_rate:.0%} floor)")
    print(f"node-test-false-positive-rate: {node_tests['false_positive_rate']:.4f} "
          f"({node_tests['num_flagged']} of {node_tests['num_windows']} honest bf16 windows of {NODE_WINDOW_TOKENS} "
          f"tokens; each test is bounded at {FALSE_POSITIVE_RATE:g} per window) (target: ≤ 0.001)")
    print(f"probation-tokens: {probation_tokens()}")


# (node dtype, temperature, top_k, top_p, validator attention)
NODE_TEST_CONFIGS = (
    ("bfloat16", 1.0, 0, 1.0, "sdpa"),
    ("bfloat16", 0.7, 0, 1.0, "sdpa"),
    ("bfloat16", 1.0, 20, 0.9, "sdpa"),
    ("bfloat16", 0.7, 20, 0.9, "sdpa"),
    ("bfloat16", 1.0, 0, 1.0, "eager"),
    ("bfloat16", 0.7, 20, 0.9, "eager"),
    ("float32", 1.0, 0, 1.0, "sdpa"),
)
QUICK_NODE_TEST_CONFIGS = (NODE_TEST_CONFIGS[0], NODE_TEST_CONFIGS[5])  # same kernels; eager validator, filters


def probation_tokens() -> int:
    """The verdicts' probation setting where the coordinator has one, else the node token window."""
    from coordinator.config import ValidationSection

    field = ValidationSection.model_fields.get("probation_tokens")
    return int(field.default) if field is not None else NODE_WINDOW_TOKENS


def measure_node_tests(num_tokens_per_config: int, node_test_configs=NODE_TEST_CONFIGS) -> dict:
    """Honest nodes' token statistics per configuration, pooled into consecutive windows, each judged."""
    from coordinator.node_stats import judge_tokens
    from coordinator.store import TokenStats
    from coordinator.validation import TOLERANCES, GroupJob, group_verdict
    from envs import get_task
    from envs.base import Split
    from node.generate import generate_batch
    from policy.bootstrap import BootstrapSettings, ensure_bootstrapped
    from policy.engine import TorchEngine
    from policy.model import load_model
    from policy.prefill import ClaimedRollout, replay
    from policy.tokenizer import load_tokenizer
    from protocol.sampling import derive_sample_seed
    from protocol.types import LeasedPrompt, SamplingParams, WorkLease

    configs, num_flagged, num_windows = [], 0, 0
    model_dir = ensure_bootstrapped(BootstrapSettings()).directory
    tokenizer = load_tokenizer(model_dir)
    task = get_task(BootstrapSettings().task)
    prompt_index = 0
    for dtype, temperature, top_k, top_p, attention in node_test_configs:
        node_model = load_model(model_dir, dtype=dtype)
        validator_model = load_model(model_dir, dtype=dtype)
        validator_model.set_attn_implementation(attention)
        engine = TorchEngine(node_model, stop_token_ids={tokenizer.eos_token_id}, max_batch_size=64)
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=32)
        window, windows, num_tokens, num_failed_groups = TokenStats(), [], 0, 0
        totals = TokenStats()
        while num_tokens < num_tokens_per_config:
            prompts = []
            for _ in range(8):
                problem = task.problem(Split.TRAIN, 0, prompt_index)
                prompts.append(LeasedPrompt(prompt_index, problem.prompt, tuple(tokenizer.encode(problem.prompt))))
                prompt_index += 1
            lease = WorkLease("bench", "bench", task.name, 1, tuple(prompts), 8, sampling, prompt_index, 0)
            batch = generate_batch(engine, tokenizer, task, 0, lease, f"torch-cpu-{dtype}").batch
            for position, (prompt, group) in enumerate(zip(prompts, batch.groups)):
                seeds = tuple(derive_sample_seed(lease.sampling_seed, position, r.sample_index)
                              for r in group.rollouts)
                job = GroupJob("bench", "bench", 1, dtype, prompt.prompt_token_ids, sampling, seeds, group.rollouts)
                reports = replay(validator_model, [
                    ClaimedRollout(prompt.prompt_token_ids, r.token_ids, r.logprobs, r.commitment, sampling, seed)
                    for r, seed in zip(group.rollouts, seeds)], TOLERANCES[dtype].logit_tolerance)
                verdict = group_verdict(job, reports, TOLERANCES[dtype])
                if not verdict.passed or verdict.tokens is None:
                    num_failed_groups += 1
                    continue
                num_tokens += verdict.tokens.num_tokens
                totals += verdict.tokens
                window += verdict.tokens
                if window.num_tokens >= NODE_WINDOW_TOKENS:
                    windows.append(judge_tokens(window, dtype))
                    window = TokenStats()
        failures = [j.failure.check for j in windows if j.failure is not None]
        if dtype == "bfloat16":
            num_flagged += len(failures)
            num_windows += len(windows)
        z = (totals.logprob_advantage_sum / math.sqrt(totals.logprob_advantage_sum_squares)
             if totals.logprob_advantage_sum_squares else 0.0)
        configs.append({
            "dtype": dtype, "temperature": temperature, "top_k": top_k, "top_p": top_p,
            "validator_attention": attention, "tokens": totals.num_tokens,
            "groups_failed_per_group_checks": num_failed_groups,
            "near_tie_rate": round(totals.num_near_ties / max(1, totals.num_tokens), 5),
            "near_ties": totals.num_near_ties, "near_ties_up": totals.num_near_ties_up,
            "near_ties_directed": totals.num_directed_near_ties,
            "near_ties_positive": totals.num_near_ties_positive,
            "near_ties_positive_expected": round(totals.near_ties_positive_expected, 2),
            "logprob_advantage_z": round(z, 3), "windows": len(windows), "windows_flagged": failures,
        })
    return {"configs": configs, "num_flagged": num_flagged, "num_windows": num_windows,
            "false_positive_rate": num_flagged / num_windows if num_windows else 0.0}


if __name__ == "__main__":
    main()
