"""Adapter: problems and rewards from a `verifiers` taskset (the `verifiers.v1` API, 0.4).

`verifiers` is an optional extra (`pip install 'rollproof[verifiers]'`); it is imported only when
an adapter is built. The taskset is read once; each of its tasks falls in the train or eval split
by its key, the same content-hash rule the built-in tasks use. A completion is scored offline
(no runtime) as the single assistant reply to the task's prompt.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Coroutine
from typing import Any

from envs.base import HashStream, Problem, Split, Task, clamp_reward, split_of_key

log = logging.getLogger(__name__)

VERIFIERS_PREFIX = "verifiers:"
DEFAULT_MAX_TASKS = 100_000


class VerifiersUnavailableError(ValueError):
    """The `verifiers` package is not installed, or the named taskset cannot be loaded."""


def run_coroutine(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion, also from inside a running event loop (in a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(asyncio.run, coroutine).result()


def prompt_text(task: Any) -> str:
    system_prompt = task.data.system_prompt
    text = task.data.prompt_text
    return f"{system_prompt}\n\n{text}" if system_prompt else text


class VerifiersTask(Task):
    """A Task over the tasks of a `verifiers.v1.Taskset` (its first `max_tasks` if unbounded)."""

    def __init__(self, name: str, taskset: Any, max_tasks: int = DEFAULT_MAX_TASKS) -> None:
        self.name = name
        self.description = f"verifiers taskset {type(taskset).__name__}"
        tasks = list(taskset if taskset.bounded else taskset.take(max_tasks))
        self._tasks_by_key = {task.key: task for task in tasks}
        self._tasks_by_split: dict[Split, list[Any]] = {Split.TRAIN: [], Split.EVAL: []}
        for key, task in self._tasks_by_key.items():
            self._tasks_by_split[split_of_key(key)].append(task)
        for split, split_tasks in self._tasks_by_split.items():
            if not split_tasks:
                raise ValueError(
                    f"task {name!r}: its {len(tasks)} tasks leave the {split.value} split empty; "
                    "a taskset needs enough distinct tasks for both splits (about 1 in 10 is held out)"
                )

    def num_problems(self, split: Split) -> int:
        return len(self._tasks_by_split[split])

    def problem(self, split: Split, seed: int, index: int) -> Problem:
        if index < 0:
            raise ValueError(f"problem index must be >= 0, got {index}")
        split_tasks = self._tasks_by_split[split]
        task = split_tasks[HashStream(f"{self.name}|{split.value}|{seed}|{index}").below(len(split_tasks))]
        answer = getattr(task.data, "answer", "")
        return Problem(prompt=prompt_text(task), answer="" if answer is None else str(answer), key=task.key)

    def reward(self, problem: Problem, completion: str) -> float:
        task = self._tasks_by_key.get(problem.key)
        if task is None:
            return 0.0
        try:
            trace = build_trace(task, completion)
            run_coroutine(task.score(trace))
            return clamp_reward(trace.reward)
        except Exception:
            log.warning("task %s: verifiers scoring failed; reward 0", self.name, exc_info=True)
            return 0.0


def build_trace(task: Any, completion: str) -> Any:
    """A finished single-turn trace: the task's prompt messages, then `completion` as the model's reply."""
    import verifiers.v1 as vf
    from verifiers.v1.graph import MessageNode
    from verifiers.v1.trace import AgentInfo, Trace, TraceTask

    messages: list[Any] = []
    if task.data.system_prompt:
        messages.append(vf.SystemMessage(content=task.data.system_prompt))
    if isinstance(task.data.prompt, str):
        messages.append(vf.UserMessage(content=task.data.prompt))
    else:
        messages.extend(task.data.prompt or [])
    messages.append(vf.AssistantMessage(content=completion))
    last = len(messages) - 1
    nodes = [
        MessageNode(parent=None if position == 0 else position - 1, message=message, sampled=position == last)
        for position, message in enumerate(messages)
    ]
    return Trace(
        task=TraceTask(type=type(task).__name__, data=task.data, key=task.key, hash=task.hash),
        agent=AgentInfo(config=vf.AgentConfig()),
        nodes=nodes,
        is_completed=True,
        ok=True,
    )


def load_verifiers_task(name: str) -> VerifiersTask:
    """The task `verifiers:<taskset id>`: loads the installed taskset package of that id."""
    taskset_id = name.removeprefix(VERIFIERS_PREFIX)
    try:
        import verifiers.v1 as vf
    except ImportError as error:
        raise VerifiersUnavailableError(
            f"task {name!r} needs the verifiers package: pip install 'rollproof[verifiers]'"
        ) from error
    try:
        taskset = vf.load_taskset(vf.TasksetConfig(id=taskset_id))
    except (ImportError, AttributeError, TypeError) as error:
        raise VerifiersUnavailableError(
            f"task {name!r}: cannot load verifiers taskset {taskset_id!r}: {error}"
        ) from error
    return VerifiersTask(name, taskset)
