"""Tasks and their verifiers: the task interface, built-in tasks, and a registry by name."""

from envs.base import Problem, Split, Task
from envs.registry import DEFAULT_TASK, UnknownTaskError, get_task, list_tasks, register_task

__all__ = [
    "DEFAULT_TASK",
    "Problem",
    "Split",
    "Task",
    "UnknownTaskError",
    "get_task",
    "list_tasks",
    "register_task",
]
