"""Tasks by name. Built-in names are listed by `list_tasks()`; `verifiers:<taskset id>` loads a
`verifiers` taskset through the adapter."""

from __future__ import annotations

from collections.abc import Callable

from envs.base import Task
from envs.code import CodeTask
from envs.math_answer import MathAnswerTask
from envs.synthetic import AdditionTask, ReverseTask, SortTask
from envs.tools import CalcTask
from envs.verifiers_adapter import VERIFIERS_PREFIX, load_verifiers_task

DEFAULT_TASK = "addition"

_FACTORIES: dict[str, Callable[[], Task]] = {
    "addition": AdditionTask,
    "reverse": ReverseTask,
    "sort": SortTask,
    "math": MathAnswerTask,
    "calc": CalcTask,
    "code": CodeTask,
}


class UnknownTaskError(ValueError):
    """No task is registered under the requested name."""


def list_tasks() -> list[str]:
    return sorted(_FACTORIES)


def register_task(name: str, factory: Callable[[], Task]) -> None:
    if name in _FACTORIES or name.startswith(VERIFIERS_PREFIX):
        raise ValueError(f"task name {name!r} is taken; pick another name")
    _FACTORIES[name] = factory


def get_task(name: str) -> Task:
    if name.startswith(VERIFIERS_PREFIX):
        return load_verifiers_task(name)
    factory = _FACTORIES.get(name)
    if factory is None:
        raise UnknownTaskError(
            f"unknown task {name!r}; known tasks: {', '.join(list_tasks())} "
            f"(or {VERIFIERS_PREFIX}<taskset id> with the verifiers extra installed)"
        )
    return factory()
