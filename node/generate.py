"""Turning a lease into a signed-ready RolloutBatch: per-sample seeds, generation, scoring.

For a multi-turn task each request carries its rollout's environment (the problem, the sample's
seed), which the engine asks at the end of every model turn; the completion then holds both
sides' tokens, its sampled mask says which the model sampled, and the reward scores the whole
transcript."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envs import Split, Task
from envs.base import MultiTurnTask
from node.config import EngineSection
from policy.engine import GenerationEngine, GenerationRequest
from policy.scoring import completion_text
from protocol.sampling import derive_sample_seed
from protocol.types import Rollout, RolloutBatch, RolloutGroup, WorkLease


@dataclass(frozen=True)
class GeneratedBatch:
    batch: RolloutBatch
    num_tokens: int


def build_engine(
    config: EngineSection, model_dir: Path, stop_token_ids: Collection[int], pad_token_id: int
) -> tuple[GenerationEngine, Any, str]:
    """The engine `config.kind` selects, the torch module the node's policy applies updates to
    (NodePolicy), and the engine's name as the node registers it."""
    name = f"{config.kind}-{config.device}-{config.dtype}"
    if config.kind == "vllm":
        from policy.vllm_engine import VllmEngine

        engine = VllmEngine(
            model_dir, stop_token_ids, max_batch_size=config.batch_size, dtype=config.dtype, device=config.device
        )
        return engine, engine.policy_model, name
    from policy.engine import TorchEngine
    from policy.model import load_model

    model = load_model(model_dir, dtype=config.dtype, device=config.device)
    engine = TorchEngine(model, stop_token_ids, max_batch_size=config.batch_size, pad_token_id=pad_token_id)
    return engine, model, name


def generate_batch(
    engine: GenerationEngine, tokenizer: Any, task: Task, run_seed: int, lease: WorkLease, engine_name: str
) -> GeneratedBatch:
    """G completions per leased prompt with the seeds the protocol derives from the lease,
    each scored by the task's verifier."""
    problems = [task.problem(Split.TRAIN, run_seed, prompt.prompt_index) for prompt in lease.prompts]
    requests = []
    for position, (prompt, problem) in enumerate(zip(lease.prompts, problems, strict=True)):
        for sample_index in range(lease.group_size):
            seed = derive_sample_seed(lease.sampling_seed, position, sample_index)
            environment = task.environment(problem, seed, tokenizer) if isinstance(task, MultiTurnTask) else None
            requests.append(GenerationRequest(prompt.prompt_token_ids, lease.sampling, seed, environment))
    generated = engine.generate(requests)
    # All completions scored at once: a task that runs code runs them concurrently.
    rewards = iter(
        task.rewards(
            [problem for problem in problems for _ in range(lease.group_size)],
            [completion_text(tokenizer, result.token_ids) for result in generated],
        )
    )
    results = iter(generated)
    groups = []
    num_tokens = 0
    for prompt in lease.prompts:
        rollouts = []
        for sample_index in range(lease.group_size):
            result = next(results)
            num_tokens += len(result.token_ids)
            rollouts.append(
                Rollout(
                    sample_index=sample_index,
                    token_ids=result.token_ids,
                    sampled_mask=result.mask,
                    logprobs=result.logprobs,
                    commitment=result.commitment,
                    finish_reason=result.finish_reason,
                    claimed_reward=next(rewards),
                )
            )
        groups.append(RolloutGroup(prompt.prompt_index, tuple(rollouts)))
    batch = RolloutBatch(
        lease_id=lease.lease_id, policy_version=lease.policy_version, groups=tuple(groups), engine=engine_name
    )
    return GeneratedBatch(batch, num_tokens)
