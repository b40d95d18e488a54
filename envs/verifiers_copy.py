"""`rollproof-copy`, a single-turn taskset written against the `verifiers.v1` API: `copy:cab=` → `cab`;
reward: the fraction of positions right. It has no `Env` of its own, so the adapter loads the task
`verifiers:rollproof-copy` as a single-turn task (envs/verifiers_adapter.py)."""

# mypy: allow-subclassing-any, allow-untyped-decorators

from __future__ import annotations

import itertools
from collections.abc import Iterator

import verifiers.v1 as vf  # type: ignore[import-untyped]

from envs.synthetic import positional_match_reward

ALPHABET = "abcdef"
WORD_LENGTH = 3


class CopyData(vf.TaskData):
    answer: str


class CopyTask(vf.Task[CopyData]):
    @vf.reward
    async def matched(self, task: CopyData, trace: vf.Trace) -> float:
        return positional_match_reward(task.answer, trace.last_reply)


class CopyTaskset(vf.Taskset[CopyTask]):
    def load(self) -> Iterator[CopyTask]:
        for letters in itertools.product(ALPHABET, repeat=WORD_LENGTH):
            word = "".join(letters)
            yield CopyTask(CopyData(prompt=f"copy:{word}=", answer=word), self.config.task)


__all__ = ["CopyTaskset"]
