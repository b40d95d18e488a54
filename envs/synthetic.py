"""Built-in tasks a tiny model can learn, verified exactly: addition, reversal, sorting."""

from __future__ import annotations

import string
from dataclasses import dataclass

from envs.base import GeneratedTask, HashStream, Problem


def exact_match_reward(answer: str, completion: str) -> float:
    return 1.0 if completion.strip() == answer else 0.0


def positional_match_reward(answer: str, completion: str) -> float:
    """Fraction of positions where the completion has the answer's character; extra or missing
    characters count as wrong positions."""
    produced = completion.strip()
    num_positions = max(len(answer), len(produced))
    if num_positions == 0:
        return 1.0
    num_correct = sum(1 for expected, got in zip(answer, produced, strict=False) if expected == got)
    return num_correct / num_positions


def random_number(stream: HashStream, num_digits: int) -> int:
    if num_digits == 1:
        return stream.below(10)
    return stream.between(10 ** (num_digits - 1), 10**num_digits - 1)


def check_length_range(name: str, low: int, high: int) -> None:
    if not 1 <= low <= high:
        raise ValueError(f"{name}: need 1 <= minimum <= maximum, got {low} and {high}")


@dataclass(frozen=True)
class AdditionTask(GeneratedTask):
    """`"12+345="` → `"357"`; reward 1 for the exact sum, else 0."""

    min_digits: int = 1
    max_digits: int = 3
    name: str = "addition"
    description: str = "add two non-negative integers; reward 1 for the exact sum"

    def __post_init__(self) -> None:
        check_length_range(self.name, self.min_digits, self.max_digits)

    def generate(self, stream: HashStream) -> Problem:
        left = random_number(stream, stream.between(self.min_digits, self.max_digits))
        right = random_number(stream, stream.between(self.min_digits, self.max_digits))
        prompt = f"{left}+{right}="
        return Problem(prompt=prompt, answer=str(left + right), key=prompt)

    def reward(self, problem: Problem, completion: str) -> float:
        return exact_match_reward(problem.answer, completion)


@dataclass(frozen=True)
class ReverseTask(GeneratedTask):
    """`"rev:abc="` → `"cba"`; partial credit: the fraction of positions right."""

    min_length: int = 3
    max_length: int = 8
    name: str = "reverse"
    description: str = "reverse a lowercase string; reward is the fraction of positions right"

    def __post_init__(self) -> None:
        check_length_range(self.name, self.min_length, self.max_length)

    def generate(self, stream: HashStream) -> Problem:
        length = stream.between(self.min_length, self.max_length)
        text = "".join(stream.choice(string.ascii_lowercase) for _ in range(length))
        prompt = f"rev:{text}="
        return Problem(prompt=prompt, answer=text[::-1], key=prompt)

    def reward(self, problem: Problem, completion: str) -> float:
        return positional_match_reward(problem.answer, completion)


@dataclass(frozen=True)
class SortTask(GeneratedTask):
    """`"sort:3141="` → `"1134"`; reward 1 for the exactly sorted digits, else 0."""

    min_length: int = 3
    max_length: int = 8
    name: str = "sort"
    description: str = "sort a string of digits ascending; reward 1 if exact"

    def __post_init__(self) -> None:
        check_length_range(self.name, self.min_length, self.max_length)

    def generate(self, stream: HashStream) -> Problem:
        length = stream.between(self.min_length, self.max_length)
        digits = "".join(stream.choice(string.digits) for _ in range(length))
        prompt = f"sort:{digits}="
        return Problem(prompt=prompt, answer="".join(sorted(digits)), key=prompt)

    def reward(self, problem: Problem, completion: str) -> float:
        return exact_match_reward(problem.answer, completion)
