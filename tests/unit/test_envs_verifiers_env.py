"""The adapter's multi-turn mapping: a `verifiers` Env replayed as a MultiTurnTask (envs/verifiers_adapter.py),
on the bundled guessing game (envs/verifiers_guess.py) and on envs that do not map."""

# mypy: allow-subclassing-any, allow-untyped-decorators

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from envs import Problem, Split, get_task
from envs.base import MultiTurnTask
from envs.verifiers_adapter import (
    UnsupportedEnvironmentError,
    VerifiersEnvTask,
    VerifiersTask,
    rendered,
    replay_environment,
)
from policy.tokenizer import load_tokenizer

pytest.importorskip("verifiers.v1")

import verifiers.v1 as vf  # type: ignore[import-untyped]  # noqa: E402

from envs.verifiers_guess import GuessEnv, GuessEnvConfig, GuessTaskset, guess_of  # noqa: E402

GUESS = "verifiers:rollproof-guess"


@pytest.fixture(scope="module")
def guess() -> VerifiersEnvTask:
    task = get_task(GUESS)
    assert isinstance(task, VerifiersEnvTask)
    return task


def secret_of(problem: Problem) -> int:
    secret = guess_of(problem.answer)
    assert secret is not None
    return secret


def wrong_guesses(problem: Problem) -> list[str]:
    return [f"[{digit}]" for digit in range(10) if digit != secret_of(problem)]


class ScriptedInteraction:
    """An interaction whose model replies are given, recording each message the env sends."""

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies
        self.sent: list[str] = []

    async def turn(self, message: str | None = None) -> Any:
        if message is not None:
            self.sent.append(message)
        if len(self.sent) == len(self.replies):
            return vf.Segment(messages=[], terminated=True)
        return vf.Segment(messages=[vf.AssistantMessage(content=self.replies[len(self.sent)])])


class ScriptedAgents:
    def __init__(self, interaction: ScriptedInteraction) -> None:
        self._interaction = interaction

    @contextlib.asynccontextmanager
    async def interaction(self, task: Any) -> AsyncIterator[ScriptedInteraction]:
        yield self._interaction

    @property
    def player(self) -> ScriptedAgents:
        return self


def messages_sent(task: Any, replies: list[str]) -> list[str]:
    """What the guessing env itself sends to an agent that replies `replies`."""
    interaction = ScriptedInteraction(replies)
    environment = replay_environment(GuessEnv, GuessTaskset(vf.TasksetConfig()))
    asyncio.run(environment.run(task, ScriptedAgents(interaction)))
    return interaction.sent


def exchange(replies: list[str], sent: list[str]) -> str:
    """The transcript of model turns `replies` answered by the env's messages `sent`."""
    return replies[0] + "".join(rendered(message) + reply for message, reply in zip(sent, replies[1:], strict=True))


def test_bundled_tasksets_load_by_id_as_single_and_multi_turn_tasks(guess: VerifiersEnvTask) -> None:
    copy = get_task("verifiers:rollproof-copy")
    assert isinstance(copy, VerifiersTask) and not isinstance(copy, MultiTurnTask)
    problem = copy.problem(Split.TRAIN, seed=0, index=0)
    assert copy.reward(problem, problem.answer) == 1.0
    assert copy.reward(problem, problem.answer[:2] + "?") == pytest.approx(2 / 3)
    assert isinstance(guess, MultiTurnTask)
    assert guess.num_problems(Split.TRAIN) > 0 and guess.num_problems(Split.EVAL) > 0


def test_limits_and_turn_end_come_from_the_env_config(guess: VerifiersEnvTask) -> None:
    config = GuessEnvConfig()
    assert guess.turn_end == config.turn_end
    assert guess.limits.max_turns == config.player.max_turns - 1  # environment turns between model turns
    assert guess.limits.max_environment_tokens == config.max_environment_tokens
    assert guess.limits.max_total_tokens == config.player.max_total_tokens


def test_environment_turns_are_the_messages_the_verifiers_env_sends(guess: VerifiersEnvTask) -> None:
    for index in range(5):
        problem = guess.problem(Split.TRAIN, seed=1, index=index)
        replies = [*wrong_guesses(problem)[index : index + 2], "x]", f"[{secret_of(problem)}]"]
        sent = messages_sent(guess.source_task(problem), replies)
        assert len(sent) == 3
        for turn, message in enumerate(sent, start=1):
            assert guess.environment_turn(problem, 0, exchange(replies[:turn], sent[: turn - 1])) == rendered(message)
        assert guess.environment_turn(problem, 0, exchange(replies, sent)) is None  # solved: the env says no more
        assert guess.reward(problem, exchange(replies, sent)) == 1.0


def test_an_exchange_the_transcript_leaves_is_over(guess: VerifiersEnvTask) -> None:
    problem = guess.problem(Split.TRAIN, seed=0, index=0)
    wrong = wrong_guesses(problem)[0]
    # The model went on without the environment's answer: the env's turns end there.
    assert guess.environment_turn(problem, 0, wrong + "x]") is None
    assert guess.reward(problem, wrong + "[" + str(secret_of(problem)) + "]") == 0.0


def test_turns_are_deterministic_across_loads_seeds_and_tokenized_rollouts(
    guess: VerifiersEnvTask, tiny_model: Path
) -> None:
    other = get_task(GUESS)
    assert isinstance(other, VerifiersEnvTask)
    stream = random.Random(0)
    for index in range(20):
        problem = guess.problem(Split.EVAL, seed=2, index=index)
        transcript = "".join(stream.choice(["[3]", "[7]", "x]", "]", "[1]\n<\n"]) for _ in range(3))
        answers = {task.environment_turn(problem, seed, transcript) for task in (guess, other) for seed in (0, 5)}
        assert len(answers) == 1, (transcript, answers)

    tokenizer = load_tokenizer(tiny_model)
    problem = guess.problem(Split.TRAIN, seed=0, index=3)
    replies = wrong_guesses(problem)[:2]
    model_ids = tokenizer.encode("".join(replies) + "[", add_special_tokens=False)
    environment = guess.environment(problem, 0, tokenizer)
    token_ids, mask = environment.transcript(model_ids)
    assert (token_ids, mask) == guess.environment(problem, 7, tokenizer).transcript(model_ids)
    environment_text = tokenizer.decode([token for token, sampled in zip(token_ids, mask, strict=True) if not sampled])
    assert environment_text == "".join(map(rendered, messages_sent(guess.source_task(problem), [*replies, "["])[:2]))


def test_limits_bound_the_environment_turns_and_the_reward(guess: VerifiersEnvTask, tiny_model: Path) -> None:
    tokenizer = load_tokenizer(tiny_model)
    problem = guess.problem(Split.TRAIN, seed=0, index=1)
    wrong = wrong_guesses(problem)
    model_ids = tokenizer.encode("".join(wrong[:6]), add_special_tokens=False)
    token_ids, mask = guess.environment(problem, 0, tokenizer).transcript(model_ids)
    assert len(mask) - sum(mask) == guess.limits.max_turns * len(rendered("<"))

    task = guess.source_task(problem)
    within_limits = wrong[: guess.limits.max_turns] + [f"[{secret_of(problem)}]"]
    assert guess.reward(problem, exchange(within_limits, messages_sent(task, within_limits))) == 1.0
    # One environment turn more than the limits allow, though it is the env's own answer: it ends the exchange.
    beyond_limits = wrong[: guess.limits.max_turns + 1] + [f"[{secret_of(problem)}]"]
    assert guess.reward(problem, exchange(beyond_limits, messages_sent(task, beyond_limits))) == 0.0


def test_environment_turns_and_rewards_work_inside_a_running_event_loop(guess: VerifiersEnvTask) -> None:
    problem = guess.problem(Split.TRAIN, seed=0, index=0)

    async def both() -> tuple[str | None, float]:
        return guess.environment_turn(problem, 0, "x]"), guess.reward(problem, problem.answer)

    assert asyncio.run(both()) == (rendered("?"), 1.0)


def test_unknown_problems_and_odd_transcripts_never_raise(guess: VerifiersEnvTask) -> None:
    problem = guess.problem(Split.TRAIN, seed=0, index=0)
    stranger = Problem(prompt="?", answer="[1]", key="not-a-task-key")
    assert guess.environment_turn(stranger, 0, "[1]") is None and guess.reward(stranger, "[1]") == 0.0
    for transcript in ["", "]", "\n?\n]", "]" * 50, "[5]\n<\n" * 10, "\x00<eos>]"]:
        answer = guess.environment_turn(problem, 0, transcript)
        assert answer is None or answer in {rendered(hint) for hint in "<>?"}
        assert 0.0 <= guess.reward(problem, transcript) <= 1.0


class EnvRewardingTurns(GuessEnv):
    """Rewards recorded by the env itself (TextArena's way) and by its finalize count with the task's."""

    async def run(self, task: Any, agents: Any) -> None:
        async with agents.player.interaction(task) as interaction:
            segment = await interaction.turn()
            while not segment.terminated:
                segment = await interaction.turn("?")
        interaction.trace.record_reward("turns", 0.125 * interaction.trace.num_turns)

    async def finalize(self, task: Any, episode: Any) -> None:
        episode.traces[0].record_reward("finished", 0.5)


def test_rewards_the_env_records_count_with_the_tasks() -> None:
    taskset = GuessTaskset(vf.TasksetConfig())
    task = VerifiersEnvTask("verifiers:test", taskset, replay_environment(EnvRewardingTurns, taskset))
    problem = task.problem(Split.TRAIN, seed=0, index=0)
    assert task.reward(problem, "x]" + rendered("?") + "y]") == pytest.approx(0.5 + 0.25)


class TwoAgentsConfig(GuessEnvConfig):
    user: vf.AgentConfig = vf.AgentConfig()


class TwoAgentsEnv(vf.Env[TwoAgentsConfig]):
    async def run(self, task: Any, agents: Any) -> None:
        await agents.player.run(task)


class SpeaksFirstEnv(GuessEnv):
    async def run(self, task: Any, agents: Any) -> None:
        async with agents.player.interaction(task) as interaction:
            await interaction.turn("hello")


class RunsWithoutInteractionEnv(GuessEnv):
    async def run(self, task: Any, agents: Any) -> None:
        await agents.player.run(task)


class RandomEnv(GuessEnv):
    async def run(self, task: Any, agents: Any) -> None:
        async with agents.player.interaction(task) as interaction:
            await interaction.turn()
            await interaction.turn(f"{random.random()}")


class SharedResourcesEnv(GuessEnv):
    async def start(self) -> None:
        self.pool = "a connection pool"


class OneTurnConfig(GuessEnvConfig):
    player: vf.AgentConfig = vf.AgentConfig(max_turns=1)


class OneTurnEnv(vf.Env[OneTurnConfig]):
    async def run(self, task: Any, agents: Any) -> None:
        async with agents.player.interaction(task) as interaction:
            await interaction.turn()


class ToolTaskset(GuessTaskset):
    @classmethod
    def toolsets(cls, config: Any) -> list[Any]:
        return ["a search tool server"]


@pytest.mark.parametrize(
    ("environment_class", "taskset_class", "complaint"),
    [
        (TwoAgentsEnv, GuessTaskset, "agents"),
        (SpeaksFirstEnv, GuessTaskset, "speaks first"),
        (RunsWithoutInteractionEnv, GuessTaskset, "agent.run"),
        (RandomEnv, GuessTaskset, "differently"),
        (OneTurnEnv, GuessTaskset, "max_turns >= 2"),
        (SharedResourcesEnv, GuessTaskset, "start()"),
        (GuessEnv, ToolTaskset, "MCP"),
    ],
)
def test_envs_whose_turns_cannot_be_rederived_are_refused_when_loaded(
    environment_class: type, taskset_class: type, complaint: str
) -> None:
    taskset = taskset_class(vf.TasksetConfig())
    with pytest.raises(UnsupportedEnvironmentError, match=complaint):
        VerifiersEnvTask("verifiers:test", taskset, replay_environment(environment_class, taskset))
