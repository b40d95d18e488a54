"""Built-in tasks a tiny model can learn, verified exactly: addition, reversal, sorting."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from envs.base import GeneratedTask, HashStream, Problem

DIGITS = re.compile("[0-9]+")


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
    """`"012+345="` → `"0357"`; reward 1 for a completion of digits whose value is the sum, else 0.

    With `fixed_width` (the default) operands are zero-padded to `max_digits` and the reference
    answer to `max_digits + 1`, so every digit sits at a fixed position: a model of ~650K parameters
    then learns the task (a warm-up reaches 0.96), while with free-width operands (`"12+345="`) it
    stalls near 0.45, unable to align digits whose positions vary from problem to problem.
    """

    min_digits: int = 1
    max_digits: int = 3
    fixed_width: bool = True
    name: str = "addition"
    description: str = "add two zero-padded non-negative integers; reward 1 for the exact sum"

    def __post_init__(self) -> None:
        check_length_range(self.name, self.min_digits, self.max_digits)

    def generate(self, stream: HashStream) -> Problem:
        left = random_number(stream, stream.between(self.min_digits, self.max_digits))
        right = random_number(stream, stream.between(self.min_digits, self.max_digits))
        operand_width, answer_width = (self.max_digits, self.max_digits + 1) if self.fixed_width else (0, 0)
        prompt = f"{left:0{operand_width}d}+{right:0{operand_width}d}="
        return Problem(prompt=prompt, answer=f"{left + right:0{answer_width}d}", key=prompt)

    def reward(self, problem: Problem, completion: str) -> float:
        produced = completion.strip()
        if not DIGITS.fullmatch(produced):
            return 0.0
        return 1.0 if produced.lstrip("0") == problem.answer.lstrip("0") else 0.0


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
