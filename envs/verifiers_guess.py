"""`rollproof-guess`, a multi-turn environment written against the `verifiers.v1` API: the model
guesses a hidden digit in a range, `guess 3-6:` → `[5]`, and the environment answers `<` (the digit
is smaller), `>` (larger) or `?` (not a guess) until the guess is right or the turns run out;
reward 1 for finding it. Loaded as the task `verifiers:rollproof-guess`.

The game is a `vf.Env` whose `run()` drives its one agent's interaction turn by turn, the pattern
of verifiers' TextArena env. Every answer is a function of the task and the guesses so far, so
the adapter re-derives each environment turn from the transcript (envs/verifiers_adapter.py).
"""

# mypy: allow-subclassing-any, allow-untyped-decorators

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import verifiers.v1 as vf  # type: ignore[import-untyped]

GUESS = re.compile(r"\[([0-9])\]")
MAX_RANGE_WIDTH = 3


def guess_of(reply: str) -> int | None:
    """The digit a reply guesses: the whole reply is one bracketed digit."""
    match = GUESS.fullmatch(reply.strip())
    return None if match is None else int(match.group(1))


def hint(guess: int | None, secret: int) -> str:
    if guess is None:
        return "?"
    return "<" if secret < guess else ">"


class GuessData(vf.TaskData):
    low: int
    high: int
    secret: int
    answer: str
    """The winning first move."""


class GuessTask(vf.Task[GuessData]):
    @vf.reward
    async def found(self, task: GuessData, trace: vf.Trace) -> float:
        return float(any(guess_of(message.content or "") == task.secret for message in trace.assistant_messages))


class GuessTaskset(vf.Taskset[GuessTask]):
    def load(self) -> Iterator[GuessTask]:
        for width in range(1, MAX_RANGE_WIDTH + 1):
            for low in range(10 - width):
                high = low + width
                for secret in range(low, high + 1):
                    prompt = f"guess {low}-{high}:"
                    data = GuessData(prompt=prompt, low=low, high=high, secret=secret, answer=f"[{secret}]")
                    yield GuessTask(data, self.config.task)


class GuessEnvConfig(vf.EnvConfig):
    player: vf.AgentConfig = vf.AgentConfig(max_turns=4, max_total_tokens=40)
    turn_end: str = "]"
    """The text that ends a model turn (read by rollproof's adapter)."""
    max_environment_tokens: int = 12
    """The environment's tokens in one rollout, all turns together (read by rollproof's adapter)."""


class GuessEnv(vf.Env[GuessEnvConfig]):
    async def run(self, task: GuessTask, agents: Any) -> None:
        async with agents.player.interaction(task) as interaction:
            segment = await interaction.turn()
            while not segment.terminated:
                guess = guess_of(segment.last_reply)
                if guess == task.data.secret:
                    break
                segment = await interaction.turn(hint(guess, task.data.secret))


__all__ = ["GuessEnv", "GuessTaskset"]
