"""The adapter that scores with a `verifiers` taskset (skipped when verifiers is not installed)."""

# mypy: allow-subclassing-any, allow-untyped-decorators

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from envs import Problem, Split, get_task
from envs.base import split_of_key
from envs.verifiers_adapter import UnsupportedEnvironmentError, VerifiersTask, VerifiersUnavailableError

pytest.importorskip("verifiers.v1")

import verifiers.v1 as vf  # type: ignore[import-untyped]  # noqa: E402


class EchoData(vf.TaskData):
    answer: str


class EchoTask(vf.Task[EchoData]):
    @vf.reward
    async def exact(self, task: EchoData, trace: vf.Trace) -> float:
        return float(trace.last_reply == task.answer)


class BrokenTask(vf.Task[EchoData]):
    @vf.reward
    async def explode(self, task: EchoData, trace: vf.Trace) -> float:
        raise RuntimeError("scorer bug")


class RuntimeTask(vf.Task[EchoData]):
    @vf.reward
    async def in_sandbox(self, task: EchoData, trace: vf.Trace, runtime: vf.Runtime) -> float:
        return 1.0


class ContainerTask(EchoTask):
    NEEDS_CONTAINER = True


class EchoTaskset(vf.Taskset[EchoTask]):
    task_class: type = EchoTask

    def load(self) -> Iterator[EchoTask]:
        for number in range(100):
            yield self.task_class(EchoData(prompt=f"Say {number}.", answer=str(number)), self.config.task)


def make_task(task_class: type = EchoTask) -> VerifiersTask:
    taskset = EchoTaskset(vf.TasksetConfig())
    taskset.task_class = task_class
    return VerifiersTask("verifiers:echo", taskset)


def test_problems_come_from_the_taskset_deterministically_and_split_by_key() -> None:
    task = make_task()
    assert task.num_problems(Split.TRAIN) + task.num_problems(Split.EVAL) == 100
    train = task.problems(Split.TRAIN, seed=3, num_problems=30)
    assert train == make_task().problems(Split.TRAIN, seed=3, num_problems=30)
    held_out = task.problems(Split.EVAL, seed=3, num_problems=30)
    assert all(split_of_key(problem.key) is Split.TRAIN for problem in train)
    assert not {problem.key for problem in train} & {problem.key for problem in held_out}
    problem = train[0]
    assert problem.prompt == f"Say {problem.answer}."


def test_rewards_come_from_the_taskset_rubric() -> None:
    task = make_task()
    problem = task.problem(Split.EVAL, seed=0, index=0)
    assert task.reward(problem, problem.answer) == 1.0
    assert task.reward(problem, problem.answer + "0") == 0.0
    assert task.reward(problem, "") == 0.0
    assert task.reward(Problem(prompt="?", answer="1", key="not-a-task-key"), "1") == 0.0


def test_rewards_work_inside_a_running_event_loop() -> None:
    task = make_task()
    problem = task.problem(Split.TRAIN, seed=0, index=0)

    async def score() -> float:
        return task.reward(problem, problem.answer)

    assert asyncio.run(score()) == 1.0


def test_a_failing_scorer_gives_reward_zero_instead_of_raising() -> None:
    task = make_task(BrokenTask)
    problem = task.problem(Split.TRAIN, seed=0, index=0)
    assert task.reward(problem, problem.answer) == 0.0


def test_unknown_taskset_id_is_a_user_error() -> None:
    with pytest.raises(VerifiersUnavailableError, match="no-such-taskset"):
        get_task("verifiers:no-such-taskset")


@pytest.mark.parametrize(("task_class", "complaint"), [(RuntimeTask, "in_sandbox"), (ContainerTask, "container")])
def test_a_taskset_scored_by_more_than_the_transcript_is_refused(task_class: type, complaint: str) -> None:
    with pytest.raises(UnsupportedEnvironmentError, match=complaint):
        make_task(task_class)
