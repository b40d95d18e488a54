"""Sandboxed re-execution of the code task against generation of the same batch.

Executions per second: the code task's reference programs, each run with its hidden tests in its own
bubblewrap sandbox, through a pool of `--concurrency` slots (default: the number of cores, as the
coordinator's). Cost ratio: the torch engine generates one lease's batch (prompts × group size) on the
default tiny model (the bootstrapped code model with --model, else a random one: its completions run to
max_tokens), then the pool re-executes that batch's programs as the coordinator does on a submission;
the ratio is re-execution time over generation time, best of --repeats, interleaved.

Prints, last: sandbox-executions-per-s and sandbox-to-generation-cost-ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer executions and repeats (under a minute)")
    parser.add_argument("--model", type=Path, help="model directory (default: a random tiny model)")
    parser.add_argument("--concurrency", type=int, default=0, help="sandbox slots (default: the number of cores)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per batch (default 4, a lease's)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    num_executions, repeats = (64, 2) if args.quick else (512, 5)

    import torch

    from envs import Split
    from envs.code import CodeTask
    from envs.sandbox import BubblewrapSandbox, SandboxPool, default_max_concurrent
    from policy.engine import GenerationRequest, TorchEngine
    from policy.model import create_tiny_model, load_model
    from policy.scoring import completion_text
    from policy.tokenizer import load_tokenizer
    from protocol.types import SamplingParams

    torch.set_num_threads(1)
    concurrency = args.concurrency or default_max_concurrent()
    pool = SandboxPool(BubblewrapSandbox(), max_concurrent=concurrency, max_queued=num_executions)
    task = CodeTask(pool=pool)

    problems = task.problems(Split.TRAIN, seed=0, num_problems=num_executions)
    rewards = task.rewards(problems, [p.answer for p in problems])  # warm-up; every reference passes
    assert rewards == [1.0] * num_executions, "a reference program failed in the sandbox"
    started = time.perf_counter()
    task.rewards(problems, [p.answer for p in problems])
    executions_per_s = num_executions / (time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model or Path(scratch)
        if args.model is None:
            create_tiny_model(model_dir)
        tokenizer = load_tokenizer(model_dir)
        engine = TorchEngine(
            load_model(model_dir), {tokenizer.eos_token_id}, max_batch_size=64, pad_token_id=tokenizer.pad_token_id
        )
    batch_problems = task.problems(Split.TRAIN, seed=1, num_problems=args.prompts)
    sampling = SamplingParams(temperature=1.0, max_tokens=args.max_tokens)
    requests = [
        GenerationRequest(tuple(tokenizer.encode(p.prompt)), sampling, seed=1000 * i + j)
        for i, p in enumerate(batch_problems)
        for j in range(args.group_size)
    ]
    per_rollout = [p for p in batch_problems for _ in range(args.group_size)]
    generation_times, execution_times = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        results = engine.generate(requests)
        generation_times.append(time.perf_counter() - started)
        completions = [completion_text(tokenizer, r.token_ids) for r in results]
        started = time.perf_counter()
        batch_rewards = task.rewards(per_rollout, completions)
        execution_times.append(time.perf_counter() - started)
    pool.close()

    num_tokens = sum(len(r.token_ids) for r in results)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; {concurrency} sandbox slots")
    print(f"reference programs: {num_executions} executions, {executions_per_s:.1f}/s")
    mean_reward = sum(batch_rewards) / len(requests)
    print(
        f"batch of {len(requests)} rollouts ({num_tokens} tokens, mean reward {mean_reward:.3f}): "
        f"generation {min(generation_times):.3f} s, re-execution {min(execution_times):.3f} s (best of {repeats})"
    )
    print(f"sandbox-executions-per-s: {executions_per_s:.1f} (target: >= 20 on 2 cores)")
    print(
        f"sandbox-to-generation-cost-ratio: {min(execution_times) / min(generation_times):.3f} "
        "(target: <= 1 at production model sizes; the tiny model generates a batch faster than Python starts 32 times)"
    )


if __name__ == "__main__":
    main()
