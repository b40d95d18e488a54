"""Held-out evaluation: greedy completions of a task's eval split, scored by its verifier."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from envs import Problem, Split, Task
from envs.base import MultiTurnTask
from policy.engine import GenerationRequest, TorchEngine
from policy.scoring import completion_text
from protocol.types import SamplingParams

DEFAULT_NUM_EVAL_PROBLEMS = 200


@dataclass(frozen=True)
class EvalResult:
    task: str
    num_problems: int
    mean_reward: float
    num_exact: int


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task,
    *,
    num_problems: int = DEFAULT_NUM_EVAL_PROBLEMS,
    seed: int = 0,
    max_tokens: int = 32,
    batch_size: int = 64,
) -> EvalResult:
    """Mean reward of greedy (T = 0) completions on the first `num_problems` eval problems."""
    problems = task.problems(Split.EVAL, seed, num_problems)
    rewards = task.rewards(problems, greedy_transcripts(model, tokenizer, task, problems, max_tokens, batch_size))
    return EvalResult(
        task=task.name,
        num_problems=len(problems),
        mean_reward=sum(rewards) / len(rewards) if rewards else 0.0,
        num_exact=sum(r == 1.0 for r in rewards),
    )


def greedy_transcripts(
    model: Any, tokenizer: Any, task: Task, problems: list[Problem], max_tokens: int, batch_size: int = 64
) -> list[str]:
    """Greedy (T = 0) completions of `problems` by the torch engine, as text; a multi-turn task's
    with its environment's turns (seed 0), the transcript its reward scores."""
    engine = TorchEngine(
        model,
        stop_token_ids={tokenizer.eos_token_id},
        max_batch_size=batch_size,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    requests = [
        GenerationRequest(
            tuple(tokenizer.encode(problem.prompt)),
            greedy,
            seed=0,
            environment=task.environment(problem, 0, tokenizer) if isinstance(task, MultiTurnTask) else None,
        )
        for problem in problems
    ]
    return [completion_text(tokenizer, result.token_ids) for result in engine.generate(requests)]
