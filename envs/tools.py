"""Tool-use tasks: the model calls a tool in a fixed syntax, the environment answers, the model
writes the final answer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from envs.base import GeneratedTask, HashStream, MultiTurnTask, Problem, TurnLimits
from envs.synthetic import DIGITS, check_length_range, random_number

CALC_PROMPT = re.compile(r"calc:([0-9]+)\*([0-9]+)=")
CALC_CALL = re.compile(r"\[([0-9]{1,9})\*([0-9]{1,9})\]$")


@dataclass(frozen=True)
class CalcTask(MultiTurnTask, GeneratedTask):
    """Multiplication with a calculator: `"calc:4721*0386="`; the model calls the calculator with
    `[4721*0386]`, the environment answers `=01822306` and a newline, and the model writes
    `01822306`. Reward 1 when the transcript's last line is digits of the product's value, else 0.

    A call is the text between the transcript's last `[` and its closing `]` (the turn end): two
    numbers of at most 9 digits joined by `*`; anything else gets no answer, and the model goes on.
    Products of numbers this size are beyond the tiny model, so the reward comes from calling the
    tool with the right operands and copying its answer. Operands are zero-padded to `max_digits`
    and the calculator prints at least 2 * max_digits digits, so every digit the model copies sits
    at a fixed position (as for `addition`: with free-width numbers the tiny model stalls near 0.4).
    """

    min_digits: int = 2
    max_digits: int = 4
    name: str = "calc"
    description: str = "multiply two integers with a calculator tool: [a*b] gets =product; reward 1 for the product"
    turn_end: str = "]"
    limits: TurnLimits = field(
        default_factory=lambda: TurnLimits(max_turns=2, max_environment_tokens=24, max_total_tokens=64)
    )

    def __post_init__(self) -> None:
        check_length_range(self.name, self.min_digits, self.max_digits)

    def generate(self, stream: HashStream) -> Problem:
        left = random_number(stream, stream.between(self.min_digits, self.max_digits))
        right = random_number(stream, stream.between(self.min_digits, self.max_digits))
        width = self.max_digits
        prompt = f"calc:{left:0{width}d}*{right:0{width}d}="
        call = f"[{left:0{width}d}*{right:0{width}d}]"
        return Problem(prompt=prompt, answer=f"{call}{self.printed(left * right)}", key=prompt)

    def printed(self, value: int) -> str:
        """How the calculator writes a number."""
        return f"{value:0{2 * self.max_digits}d}"

    def environment_turn(self, problem: Problem, seed: int, transcript: str) -> str | None:
        call = CALC_CALL.search(transcript)
        if call is None:
            return None
        return f"={self.printed(int(call.group(1)) * int(call.group(2)))}\n"

    def reward(self, problem: Problem, completion: str) -> float:
        operands = CALC_PROMPT.fullmatch(problem.prompt)
        assert operands is not None, f"not a calc prompt: {problem.prompt!r}"
        final_line = completion.rsplit("\n", 1)[-1].strip()
        if not DIGITS.fullmatch(final_line):
            return 0.0
        product = int(operands.group(1)) * int(operands.group(2))
        return 1.0 if (final_line.lstrip("0") or "0") == str(product) else 0.0
