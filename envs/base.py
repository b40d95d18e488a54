"""The task interface: deterministic problems by (split, seed, index) and a verifier.

A problem's split is a function of its content (`split_of_key`), so the train and eval splits
are disjoint for every seed. The randomness that builds a problem comes from SHA-256 of a
string key (`HashStream`), so every party that knows (task, split, seed, index) derives the
same problem on any platform and Python version.
"""

from __future__ import annotations

import enum
import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

ItemT = TypeVar("ItemT")

EVAL_BUCKETS = 10
"""One problem in EVAL_BUCKETS (by content hash) belongs to the held-out eval split."""

MAX_GENERATION_ATTEMPTS = 10_000


class Split(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"


@dataclass(frozen=True)
class Problem:
    prompt: str
    """The text the policy continues."""
    answer: str
    """The reference completion (used for supervised warm-up and shown to verifiers)."""
    key: str
    """Stable identity of the problem's content; it decides the problem's split."""


def split_of_key(key: str) -> Split:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return Split.EVAL if int.from_bytes(digest[:8], "big") % EVAL_BUCKETS == 0 else Split.TRAIN


class HashStream:
    """Uniform random integers from SHA-256(key ‖ counter): portable and reproducible."""

    def __init__(self, key: str) -> None:
        self._key = key.encode("utf-8")
        self._counter = 0

    def next_u64(self) -> int:
        digest = hashlib.sha256(self._key + b"\x00" + self._counter.to_bytes(8, "big")).digest()
        self._counter += 1
        return int.from_bytes(digest[:8], "big")

    def below(self, bound: int) -> int:
        """Uniform in [0, bound), by rejection (no modulo bias)."""
        assert 0 < bound <= 2**64
        limit = 2**64 - (2**64 % bound)
        while True:
            value = self.next_u64()
            if value < limit:
                return value % bound

    def between(self, low: int, high: int) -> int:
        """Uniform in [low, high], both ends included."""
        return low + self.below(high - low + 1)

    def choice(self, items: Sequence[ItemT]) -> ItemT:
        return items[self.below(len(items))]


class Task(ABC):
    """A task: deterministic problems and a verifier that maps a completion to a reward."""

    name: str
    description: str

    @abstractmethod
    def problem(self, split: Split, seed: int, index: int) -> Problem:
        """The problem at `index` of `split` under `seed`; the same arguments give the same problem."""

    @abstractmethod
    def reward(self, problem: Problem, completion: str) -> float:
        """The reward of `completion` for `problem`, in [0, 1]. Never raises on any completion."""

    def rewards(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]:
        """`reward` of each pair; a task whose verifier runs code overrides it to run them concurrently."""
        return [self.reward(problem, completion) for problem, completion in zip(problems, completions, strict=True)]

    def problems(self, split: Split, seed: int, num_problems: int, start: int = 0) -> list[Problem]:
        return [self.problem(split, seed, index) for index in range(start, start + num_problems)]


class GeneratedTask(Task):
    """A task whose problems are drawn from a HashStream; subclasses say how to draw one."""

    @abstractmethod
    def generate(self, stream: HashStream) -> Problem:
        """Draw one problem, using only `stream` for randomness."""

    def problem(self, split: Split, seed: int, index: int) -> Problem:
        if index < 0:
            raise ValueError(f"problem index must be >= 0, got {index}")
        for attempt in range(MAX_GENERATION_ATTEMPTS):
            candidate = self.generate(HashStream(f"{self.name}|{split.value}|{seed}|{index}|{attempt}"))
            if split_of_key(candidate.key) is split:
                return candidate
        raise AssertionError(f"{self.name}: no {split.value} problem in {MAX_GENERATION_ATTEMPTS} draws")


def clamp_reward(value: float) -> float:
    """A finite reward in [0, 1]; anything not a finite number counts as 0."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0.0
    return min(1.0, max(0.0, float(value)))


@dataclass(frozen=True)
class TurnLimits:
    """What one rollout of a multi-turn task may hold: every party enforces the same limits."""

    max_turns: int
    """Environment turns."""
    max_environment_tokens: int
    """Environment tokens, all turns together."""
    max_total_tokens: int
    """Tokens after the prompt, model and environment turns together."""

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_environment_tokens", "max_total_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"turn limits: {name} must be >= 1, got {getattr(self, name)}")


class MultiTurnTask(Task):
    """A task whose rollouts interleave model turns and environment turns (tool results,
    observations). A model turn ends with the `turn_end` text (one token), EOS, or the length
    cap; after one that ends with `turn_end`, the environment answers with `environment_turn`,
    its tokens are appended (never sampled), and the model goes on. The reward is computed from
    the whole transcript: model and environment turns, as text."""

    turn_end: str
    limits: TurnLimits

    @abstractmethod
    def environment_turn(self, problem: Problem, seed: int, transcript: str) -> str | None:
        """The environment's answer to `transcript` (the completion so far, ending with a model turn
        that ended in `turn_end`), or None when it has nothing to say and the model goes on. A
        deterministic function of its arguments: every party re-derives it. `problem.answer` is the
        model's side of a reference rollout (its turns, without the environment's)."""

    def environment(self, problem: Problem, seed: int, tokenizer: Any) -> RolloutEnvironment:
        return RolloutEnvironment(self, problem, seed, tokenizer)


class RolloutEnvironment:
    """A multi-turn task's environment for one rollout (a problem and a sample seed), in tokens:
    transcripts are decoded and answers encoded with the run's tokenizer, the same way by the node,
    the coordinator and the warm-up."""

    def __init__(self, task: MultiTurnTask, problem: Problem, seed: int, tokenizer: Any):
        turn_end_ids = tokenizer.encode(task.turn_end, add_special_tokens=False)
        if len(turn_end_ids) != 1:
            raise ValueError(
                f"task {task.name}: its turn end {task.turn_end!r} must be one token of this tokenizer, "
                f"it is {len(turn_end_ids)}"
            )
        self.task = task
        self.problem = problem
        self.seed = seed
        self.tokenizer = tokenizer
        self.limits = task.limits
        self.turn_end_token_id: int = turn_end_ids[0]

    def next_turn(self, completion_ids: Sequence[int], num_turns: int, num_environment_tokens: int) -> tuple[int, ...]:
        """The environment's tokens after `completion_ids` (which hold `num_turns` environment turns
        of `num_environment_tokens` tokens and end with a model turn ending in the turn end); empty
        when it says nothing, or when its answer would break a limit (the model then goes on)."""
        if num_turns >= self.limits.max_turns:
            return ()
        transcript = self.tokenizer.decode(list(completion_ids), skip_special_tokens=True)
        answer = self.task.environment_turn(self.problem, self.seed, transcript)
        if not answer:
            return ()
        answer_ids = tuple(self.tokenizer.encode(answer, add_special_tokens=False))
        if (
            num_environment_tokens + len(answer_ids) > self.limits.max_environment_tokens
            or len(completion_ids) + len(answer_ids) >= self.limits.max_total_tokens
        ):
            return ()
        return answer_ids

    def transcript(self, model_token_ids: Sequence[int]) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        """The completion an honest node makes of these model tokens, and its sampled mask: after
        each model token that is the turn end (the last excepted: the rollout ended there), the
        environment's answer."""
        token_ids: list[int] = []
        mask: list[bool] = []
        num_turns = 0
        last = len(model_token_ids) - 1
        for index, token_id in enumerate(model_token_ids):
            token_ids.append(token_id)
            mask.append(True)
            if token_id == self.turn_end_token_id and index < last:
                answer = self.next_turn(token_ids, num_turns, len(mask) - sum(mask))
                if answer:
                    num_turns += 1
                    token_ids.extend(answer)
                    mask.extend([False] * len(answer))
        return tuple(token_ids), tuple(mask)
