"""Adapter: problems, rewards and environment turns from `verifiers` (the `verifiers.v1` API, 0.4).

`verifiers` is an optional extra (`pip install 'rollproof[verifiers]'`); it is imported only when
an adapter is built. The task `verifiers:<taskset id>` loads a taskset package the way verifiers
does (an installed package exporting its `Taskset` subclass, and optionally its `Env` subclass,
through `__all__`); the ids in BUNDLED_TASKSETS name the ones that ship in this package. The
taskset is read once; each of its tasks falls in the train or eval split by its key, the same
content-hash rule the built-in tasks use.

A taskset without an `Env` of its own (verifiers' single-agent case) is a single-turn task: a
completion is scored offline as the single assistant reply to the task's prompt.

A taskset whose package exports an `Env` is a multi-turn task. verifiers expresses multi-turn as
the env's `run(task, agents)`: it opens one agent's `interaction(task)`, takes the model's reply
with `turn()` and answers with `turn(message)` until it stops asking or the segment comes back
`terminated` (TextArena's games and the user simulator work this way). That maps onto
MultiTurnTask as follows:

- a model turn is the model's text up to and including the task's turn end (the env config's
  `turn_end` field, else DEFAULT_TURN_END); the env's message to `turn(message)` is the
  environment turn, appended as `"\\n" + message + "\\n"`;
- `environment_turn` re-runs the env's `run()` against the transcript: each `turn()` returns the
  transcript's next model turn, and the message the env sends after the last one is the answer.
  An env that stops asking, or whose message the transcript does not hold next (a limit withheld
  it), has ended the exchange: the model's further text continues its last reply;
- the reward re-runs the whole exchange (the last model turn comes back `terminated`), then the
  task's rewards and metrics on that trace (`Task.score`, no runtime), then the env's `finalize`;
- limits: the agent's `max_turns` (model turns) allows one environment turn fewer, its
  `max_total_tokens` caps the tokens after the prompt, and the env config's
  `max_environment_tokens` field (else DEFAULT_MAX_ENVIRONMENT_TOKENS) caps the environment's
  tokens; unset ones take the defaults below.

The env sees no sample seed: its turns are a function of the task and the model's turns alone.

What does not map raises UnsupportedEnvironmentError (a ValueError) when the task is loaded: a
second agent (a simulated user or judge model answers with a model, not a function of the
transcript), tool servers (verifiers serves tools over MCP, out of process, to the structured
tool calls of a harness), model judges, tasks that need a container or signals that need a
runtime, env-owned shared resources (`start`/`stop`), an env that speaks first (a prompt-less
task), runs without an interaction (`agent.run`, where the harness, not the env, makes the
turns), multi-message turns, and an env whose answer to the same transcript differs between two
runs. The last four are found by a probe on one transcript: an env must be a deterministic
function of its task and the model's turns (no clock, no unseeded randomness, no network) for
the coordinator to re-derive its turns, which the probe cannot prove; an env that breaks a rule
only on some transcripts gives those no environment turn and reward 0.

The transcript is text, without the sampled mask: where a limit withheld the env's answer, model
text that reproduces it reads as the answer (while the turn limit allows one more).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import inspect
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from envs.base import HashStream, MultiTurnTask, Problem, Split, Task, TurnLimits, clamp_reward, split_of_key

log = logging.getLogger(__name__)

VERIFIERS_PREFIX = "verifiers:"
DEFAULT_MAX_TASKS = 100_000
BUNDLED_TASKSETS = {"rollproof-copy": "envs.verifiers_copy", "rollproof-guess": "envs.verifiers_guess"}
"""Taskset ids whose packages ship with rollproof, and the modules that hold them."""

DEFAULT_TURN_END = "\n"
DEFAULT_MAX_MODEL_TURNS = 8
DEFAULT_MAX_ENVIRONMENT_TOKENS = 256
DEFAULT_MAX_TOTAL_TOKENS = 512


class VerifiersUnavailableError(ValueError):
    """The `verifiers` package is not installed, or the named taskset cannot be loaded."""


class UnsupportedEnvironmentError(ValueError):
    """A taskset or env whose rewards or turns rollproof cannot re-derive from the transcript."""


def verifiers_api() -> Any:
    """The `verifiers.v1` module (`vf`), imported on first use."""
    import verifiers.v1 as vf  # type: ignore[import-untyped]

    return vf


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


def requires_runtime(hook: Any) -> bool:
    """Whether a scoring hook takes a runtime it cannot do without (verifiers skips it offline)."""
    parameter = inspect.signature(hook).parameters.get("runtime")
    return parameter is not None and parameter.default is inspect.Parameter.empty


def check_offline(name: str, taskset: Any, task: Any) -> None:
    """Raise UnsupportedEnvironmentError unless `task`'s rewards are a function of its transcript."""
    if task.NEEDS_CONTAINER:
        raise UnsupportedEnvironmentError(f"task {name!r}: its tasks need a container; rollproof scores offline")
    if type(taskset).toolsets(taskset.config) or type(task).toolsets(task.config):
        raise UnsupportedEnvironmentError(
            f"task {name!r}: its tools are MCP servers called out of process; answer the model from the env's "
            "run() instead (each answer a function of the transcript)"
        )
    if task.config.judges:
        raise UnsupportedEnvironmentError(f"task {name!r}: its judges call a model; rewards must be offline functions")
    signals = [hook.__name__ for hook in (*task.hooks("metric"), *task.hooks("reward")) if requires_runtime(hook)]
    if signals:
        raise UnsupportedEnvironmentError(f"task {name!r}: its signals {signals} need a runtime; rollproof has none")


class VerifiersTask(Task):
    """A Task over the tasks of a `verifiers.v1.Taskset` (its first `max_tasks` if unbounded)."""

    def __init__(self, name: str, taskset: Any, max_tasks: int = DEFAULT_MAX_TASKS) -> None:
        self.name = name
        self.description = f"verifiers taskset {type(taskset).__name__}"
        tasks = list(taskset if taskset.bounded else taskset.take(max_tasks))
        if tasks:
            check_offline(name, taskset, tasks[0])
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

    def source_task(self, problem: Problem) -> Any | None:
        """The verifiers task `problem` comes from; None for a problem not of this taskset."""
        return self._tasks_by_key.get(problem.key)

    def reward(self, problem: Problem, completion: str) -> float:
        task = self.source_task(problem)
        if task is None:
            return 0.0
        try:
            trace = build_trace(task, completion)
            run_coroutine(task.score(trace))
            return clamp_reward(trace.reward)
        except Exception:
            log.warning("task %s: verifiers scoring failed; reward 0", self.name, exc_info=True)
            return 0.0


def open_trace(task: Any) -> Any:
    """A trace of `task` holding its prompt messages, to which the exchange's messages are appended."""
    vf = verifiers_api()

    trace = vf.Trace(
        task=vf.TraceTask(type=type(task).__name__, data=task.data, key=task.key, hash=task.hash),
        agent=vf.AgentInfo(config=vf.AgentConfig()),
    )
    if task.data.system_prompt:
        append_message(trace, vf.SystemMessage(content=task.data.system_prompt), sampled=False)
    if isinstance(task.data.prompt, str):
        append_message(trace, vf.UserMessage(content=task.data.prompt), sampled=False)
    else:
        for message in task.data.prompt or []:
            append_message(trace, message, sampled=False)
    return trace


def append_message(trace: Any, message: Any, sampled: bool) -> None:
    vf = verifiers_api()

    parent = len(trace.nodes) - 1 if trace.nodes else None
    trace.nodes.append(vf.MessageNode(parent=parent, message=message, sampled=sampled))


def close_trace(trace: Any) -> Any:
    trace.is_completed = True
    trace.ok = True
    return trace


def build_trace(task: Any, completion: str) -> Any:
    """A finished single-turn trace: the task's prompt messages, then `completion` as the model's reply."""
    vf = verifiers_api()

    trace = open_trace(task)
    append_message(trace, vf.AssistantMessage(content=completion), sampled=True)
    return close_trace(trace)


def rendered(message: str) -> str:
    """An environment message as the transcript holds it."""
    return f"\n{message}\n"


class TranscriptReader:
    """A transcript read front to back as model turns (each up to and including the turn end) and
    the environment's rendered messages."""

    def __init__(self, transcript: str, turn_end: str, max_environment_turns: int) -> None:
        self.rest = transcript
        self.turn_end = turn_end
        self.environment_turns_left = max_environment_turns

    def next_model_turn(self) -> str | None:
        if not self.rest:
            return None
        end = self.rest.find(self.turn_end)
        cut = len(self.rest) if end < 0 else end + len(self.turn_end)
        model_turn, self.rest = self.rest[:cut], self.rest[cut:]
        return model_turn

    def take_environment_turn(self, text: str) -> bool:
        """Consume `text` if the transcript holds it next and the limits allowed it."""
        if self.environment_turns_left < 1 or not self.rest.startswith(text):
            return False
        self.environment_turns_left -= 1
        self.rest = self.rest[len(text) :]
        return True


class ReplayInteraction:
    """Stands in for `vf.Interaction`: the model's turns come from the transcript. `answer`, when
    given, receives the env's message after the transcript's last model turn; the env then waits
    until the replay cancels it."""

    def __init__(self, trace: Any, reader: TranscriptReader, answer: asyncio.Future[str] | None) -> None:
        self.trace = trace
        self._reader = reader
        self._answer = answer
        self._started = False
        self._over = False

    async def turn(self, message: Any = None) -> Any:
        vf = verifiers_api()

        if self._over:
            raise UnsupportedEnvironmentError("the env asked for a turn after the exchange ended")
        if (message is None) == self._started:
            raise UnsupportedEnvironmentError(
                "the env must take the model's opening reply with a bare turn(), then answer each reply with "
                "turn(message); an env that speaks first or lets the model speak twice does not map"
            )
        if message is not None:
            if not isinstance(message, str):
                raise UnsupportedEnvironmentError("the env answers with Messages; only text turns map")
            text = rendered(message)
            if self._answer is not None and not self._reader.rest:
                self._answer.set_result(text)
                await asyncio.Event().wait()
            if not self._reader.take_environment_turn(text):
                return self._end()
            append_message(self.trace, vf.UserMessage(content=message), sampled=False)
        self._started = True
        model_turn = self._reader.next_model_turn()
        if model_turn is None:
            return self._end()
        append_message(self.trace, vf.AssistantMessage(content=model_turn), sampled=True)
        return vf.Segment(messages=[vf.AssistantMessage(content=model_turn)])

    def _end(self) -> Any:
        """End the exchange; the model's text after it continues its last reply."""
        vf = verifiers_api()

        self._over = True
        last = self.trace.nodes[-1]
        if self._reader.rest and last.sampled:
            last.message = vf.AssistantMessage(content=last.message.content + self._reader.rest)
            self._reader.rest = ""
        return vf.Segment(messages=[], terminated=True)


class ReplayAgent:
    """Stands in for the env's one `vf.Agent`: a single interaction on the episode's task."""

    def __init__(self, task: Any, interaction: ReplayInteraction) -> None:
        self._task = task
        self._interaction: ReplayInteraction | None = interaction

    @contextlib.asynccontextmanager
    async def interaction(self, task: Any) -> AsyncIterator[ReplayInteraction]:
        if self._interaction is None:
            raise UnsupportedEnvironmentError("the env opens a second interaction; one exchange per episode maps")
        if (task.data.system_prompt, task.data.prompt) != (self._task.data.system_prompt, self._task.data.prompt):
            raise UnsupportedEnvironmentError("the env hands its agent another prompt than the task's")
        interaction, self._interaction = self._interaction, None
        yield interaction

    async def run(self, task: Any) -> None:
        raise UnsupportedEnvironmentError(
            "the env runs its agent without an interaction (agent.run): the harness makes those turns, not the env"
        )


class ReplayAgents:
    """Stands in for `vf.Agents`: the env's one role, by its name."""

    def __init__(self, role: str, agent: ReplayAgent) -> None:
        self._role = role
        self._agent = agent

    def __getattr__(self, name: str) -> ReplayAgent:
        if name != self._role:
            raise AttributeError(f"no agent {name!r}; this env declares {self._role!r}")
        return self._agent


@dataclass(frozen=True)
class Replay:
    trace: Any
    """The exchange so far, as verifiers records it."""
    answer: str | None
    """The env's rendered message after the transcript's last model turn, if it sent one."""


class VerifiersEnvTask(VerifiersTask, MultiTurnTask):
    """A MultiTurnTask whose environment turns and rewards come from replaying a `verifiers.v1.Env`
    (module docstring: what maps)."""

    def __init__(self, name: str, taskset: Any, environment: Any, max_tasks: int = DEFAULT_MAX_TASKS) -> None:
        vf = verifiers_api()

        super().__init__(name, taskset, max_tasks)
        self.description = f"verifiers env {type(environment).__name__} over taskset {type(taskset).__name__}"
        self._environment = environment
        config = environment.config
        roles = {role: agent for role, agent in config if isinstance(agent, vf.AgentConfig)}
        if len(roles) != 1:
            raise UnsupportedEnvironmentError(
                f"task {name!r}: its env declares the agents {sorted(roles)}; one agent (the policy) maps, since "
                "another agent's turns come from a model, not from a function of the transcript"
            )
        if type(environment).start is not vf.Env.start:
            raise UnsupportedEnvironmentError(
                f"task {name!r}: its env brings up shared resources in start(), which a replay does not run"
            )
        ((self._role, agent),) = roles.items()
        max_model_turns = agent.max_turns or DEFAULT_MAX_MODEL_TURNS
        if max_model_turns < 2:
            raise UnsupportedEnvironmentError(
                f"task {name!r}: its agent plays {max_model_turns} turn; a multi-turn env needs max_turns >= 2"
            )
        self.turn_end = getattr(config, "turn_end", DEFAULT_TURN_END)
        self.limits = TurnLimits(
            max_turns=max_model_turns - 1,
            max_environment_tokens=getattr(config, "max_environment_tokens", DEFAULT_MAX_ENVIRONMENT_TOKENS),
            max_total_tokens=agent.max_total_tokens or DEFAULT_MAX_TOTAL_TOKENS,
        )
        self._check_deterministic()

    def _check_deterministic(self) -> None:
        probe = self.source_task(self.problem(Split.TRAIN, 0, 0))
        try:
            answers = {run_coroutine(self.replay(probe, self.turn_end, answering=True)).answer for _ in range(2)}
        except UnsupportedEnvironmentError as error:
            raise UnsupportedEnvironmentError(f"task {self.name!r}: {error}") from error
        if len(answers) != 1:
            raise UnsupportedEnvironmentError(
                f"task {self.name!r}: its env answers the same transcript differently ({sorted(map(repr, answers))}); "
                "its turns must be a function of the task and the model's turns"
            )

    async def replay(self, task: Any, transcript: str, answering: bool) -> Replay:
        """Run the env's episode on `task` with the model's turns read from `transcript`; `answering`:
        stop at the env's message after the last model turn instead of ending the exchange there."""
        trace = open_trace(task)
        reader = TranscriptReader(transcript, self.turn_end, self.limits.max_turns)
        answer: asyncio.Future[str] | None = asyncio.get_running_loop().create_future() if answering else None
        agents = ReplayAgents(self._role, ReplayAgent(task, ReplayInteraction(trace, reader, answer)))
        await self._environment.setup(agents)
        run = asyncio.ensure_future(self._environment.run(task, agents))
        waiting = {run} if answer is None else {run, answer}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if answer is not None and answer.done():
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
            return Replay(trace, answer.result())
        run.result()
        return Replay(trace, None)

    def environment_turn(self, problem: Problem, seed: int, transcript: str) -> str | None:
        task = self.source_task(problem)
        if task is None:
            return None
        try:
            answer: str | None = run_coroutine(self.replay(task, transcript, answering=True)).answer
            return answer
        except Exception:
            log.warning("task %s: verifiers env replay failed; no environment turn", self.name, exc_info=True)
            return None

    def reward(self, problem: Problem, completion: str) -> float:
        task = self.source_task(problem)
        if task is None:
            return 0.0
        try:
            trace: Any = run_coroutine(self.score(task, completion))
            return clamp_reward(trace.reward)
        except Exception:
            log.warning("task %s: verifiers env scoring failed; reward 0", self.name, exc_info=True)
            return 0.0

    async def score(self, task: Any, completion: str) -> Any:
        """The finished trace of the exchange in `completion`, with the task's and the env's rewards."""
        vf = verifiers_api()

        trace = close_trace((await self.replay(task, completion, answering=False)).trace)
        await task.score(trace)
        episode = vf.Episode(task=trace.task, traces=[trace], ok=True)
        await self._environment.finalize(task, episode)
        return episode.traces[0]


def exported_class(module: ModuleType, base: type) -> type | None:
    """The subclass of `base` that a plugin module exports through `__all__` (verifiers' rule), if any."""
    found = [
        value
        for value in (getattr(module, name, None) for name in getattr(module, "__all__", ()))
        if isinstance(value, type) and issubclass(value, base) and value is not base
    ]
    if len(found) > 1:
        raise VerifiersUnavailableError(f"module {module.__name__!r} exports several {base.__name__} classes: {found}")
    return found[0] if found else None


def replay_environment(environment_class: type, taskset: Any) -> Any:
    """An instance of `environment_class` with its default config over `taskset`, for replay.
    `Env.__init__` does not run: it resolves the taskset by installed id and loads each agent's
    harness (the program that would call a model); a replay needs neither."""
    from verifiers.v1.utils.generic import concrete_type  # type: ignore[import-untyped]

    vf = verifiers_api()

    environment: Any = object.__new__(environment_class)
    environment.config = (concrete_type(environment_class, vf.EnvConfig, origin=vf.Env) or vf.EnvConfig)()
    environment.taskset = taskset
    return environment


def load_verifiers_task(name: str) -> VerifiersTask:
    """The task `verifiers:<taskset id>`: a bundled taskset, else the installed taskset package of that id."""
    taskset_id = name.removeprefix(VERIFIERS_PREFIX)
    try:
        vf = verifiers_api()
    except ImportError as error:
        raise VerifiersUnavailableError(
            f"task {name!r} needs the verifiers package: pip install 'rollproof[verifiers]'"
        ) from error
    try:
        bundled = BUNDLED_TASKSETS.get(taskset_id)
        module = importlib.import_module(bundled) if bundled else vf.import_taskset(taskset_id)
    except ImportError as error:
        raise VerifiersUnavailableError(
            f"task {name!r}: cannot load verifiers taskset {taskset_id!r}: {error}"
        ) from error
    taskset_class = exported_class(module, vf.Taskset)
    if taskset_class is None:
        raise VerifiersUnavailableError(f"task {name!r}: module {module.__name__!r} exports no verifiers Taskset")
    taskset = taskset_class(vf.TasksetConfig(id=taskset_id))
    environment_class = exported_class(module, vf.Env)
    if environment_class is None or issubclass(environment_class, vf.SingleAgentEnv):
        return VerifiersTask(name, taskset)
    return VerifiersEnvTask(name, taskset, replay_environment(environment_class, taskset))
