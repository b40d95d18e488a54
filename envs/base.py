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
from typing import TypeVar

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
