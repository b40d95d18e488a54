"""The code task: deterministic problems, reference answers that pass, partial credit by hidden tests, and
malformed programs that earn 0 without raising. Rewards come from running each program in the sandbox."""

from __future__ import annotations

import threading

import pytest

from envs import Split, get_task, list_tasks
from envs.base import split_of_key
from envs.code import NUM_HIDDEN_TESTS, CodeTask, hidden_inputs, parse_linear_prompt
from envs.sandbox import (
    BubblewrapSandbox,
    Sandbox,
    SandboxPool,
    SandboxRequest,
    SandboxResult,
)
from tests.unit.test_sandbox import bubblewrap_or_skip


@pytest.fixture(scope="module")
def sandbox() -> BubblewrapSandbox:
    return bubblewrap_or_skip()


@pytest.fixture(scope="module")
def task(sandbox) -> CodeTask:
    return CodeTask(pool=SandboxPool(sandbox, max_concurrent=4, max_queued=256))


class RecordingSandbox(Sandbox):
    """Runs each request on `inner` and keeps the programs it ran."""

    def __init__(self, inner: Sandbox):
        self.inner = inner
        self.programs: list[str] = []
        self.lock = threading.Lock()

    def run(self, request: SandboxRequest) -> SandboxResult:
        with self.lock:
            self.programs.append(request.argv[-1])
        return self.inner.run(request)


def test_code_is_a_registered_task_with_deterministic_problems_in_disjoint_splits() -> None:
    assert "code" in list_tasks()
    task = get_task("code")
    first = task.problems(Split.TRAIN, seed=1, num_problems=50)
    assert first == CodeTask().problems(Split.TRAIN, seed=1, num_problems=50)
    assert first != task.problems(Split.TRAIN, seed=2, num_problems=50)
    assert len({p.prompt for p in first}) > 40
    evals = task.problems(Split.EVAL, seed=1, num_problems=50)
    assert all(split_of_key(p.key) is Split.EVAL for p in evals)
    assert not {p.key for p in evals} & {p.key for p in task.problems(Split.TRAIN, seed=1, num_problems=500)}


def test_a_problem_shows_two_values_of_its_function_and_hides_the_tests() -> None:
    problem = CodeTask().problem(Split.TRAIN, seed=0, index=0)
    intercept, slope = parse_linear_prompt(problem.prompt)
    assert problem.prompt == f"f(0)={intercept};f(1)={intercept + slope};f(x)="
    assert eval(f"lambda x: {problem.answer}")(7) == intercept + 7 * slope
    inputs = hidden_inputs(problem.key)
    assert len(set(inputs)) == NUM_HIDDEN_TESTS and inputs[0] == 1 and 0 not in inputs
    assert inputs == hidden_inputs(problem.key)


def test_reference_answers_and_equivalent_programs_pass_every_test(task) -> None:
    problems = task.problems(Split.EVAL, seed=0, num_problems=8)
    assert task.rewards(problems, [p.answer for p in problems]) == [1.0] * 8
    intercept, slope = parse_linear_prompt(problems[0].prompt)
    equivalent = [f"{slope}*x+{intercept}", f" ({intercept}) + x*({slope}) ", f"sum([{intercept}] + [{slope}] * x)"]
    rewards = task.rewards([problems[0]] * 3, equivalent)
    assert rewards[:2] == [1.0, 1.0]
    # `[s] * x` is empty for negative x: the program is right only on the hidden inputs >= 0.
    num_non_negative = sum(x >= 0 for x in hidden_inputs(problems[0].key))
    assert rewards[2] == num_non_negative / NUM_HIDDEN_TESTS


def test_partial_credit_is_the_fraction_of_hidden_tests_passed(task) -> None:
    problem = task.problem(Split.TRAIN, seed=0, index=5)
    intercept, slope = parse_linear_prompt(problem.prompt)
    inputs = hidden_inputs(problem.key)
    right_where_not_negative = f"{intercept}+{slope}*abs(x)"
    cubic = f"{intercept}+{slope}*x**3"  # right at -1 and 1
    rewards = task.rewards([problem] * 2, [right_where_not_negative, cubic])
    assert rewards[0] == sum(x > 0 for x in inputs) / NUM_HIDDEN_TESTS
    assert rewards[1] == sum(x in (-1, 1) for x in inputs) / NUM_HIDDEN_TESTS
    assert 0 < rewards[1] < rewards[0] < 1


def test_copying_the_intercept_or_guessing_the_slope_wrong_earns_nothing(task) -> None:
    problem = task.problem(Split.TRAIN, seed=0, index=5)
    intercept, slope = parse_linear_prompt(problem.prompt)
    assert task.rewards([problem] * 2, [str(intercept), f"{intercept}+{slope + 1}*x"]) == [0.0, 0.0]


@pytest.mark.parametrize(
    "completion",
    ["", " ", "\n", "x" * 300, "\x00", "1/0", "None", "1.5*x", "'a'", "x+", ")", "lambda: 1", "ünïcødé", "{" * 500],
)
def test_malformed_programs_earn_nothing_and_never_raise(task, completion) -> None:
    problem = task.problem(Split.TRAIN, seed=0, index=1)
    assert task.reward(problem, completion) == 0.0


def test_a_program_sees_none_of_the_hosts_environment(task, monkeypatch) -> None:
    problem = task.problem(Split.TRAIN, seed=0, index=2)
    monkeypatch.setenv("ROLLPROOF_HINT", "1")
    program = f"({problem.answer}) if __import__('os').environ.get('ROLLPROOF_HINT') else 0"
    assert task.reward(problem, program) == 0.0


def test_a_program_that_recurs_for_a_problem_runs_once_and_every_copy_gets_its_reward(sandbox) -> None:
    recording = RecordingSandbox(sandbox)
    task = CodeTask(pool=SandboxPool(recording, max_concurrent=4, max_queued=64))
    first, second = task.problems(Split.TRAIN, seed=0, num_problems=2)
    rewards = task.rewards(
        [first, first, first, second, first],
        [first.answer, f" {first.answer}\n", "0", first.answer, first.answer],
    )
    assert sorted(recording.programs) == sorted([first.answer, "0", first.answer])
    assert rewards[:2] == [1.0, 1.0] and rewards[4] == 1.0 and rewards[3] < 1.0
    # Copies of a program whose result varies from run to run share the one run's reward.
    coin = f"({first.answer})if __import__('random').random()<0.5 else None"
    assert len(set(task.rewards([first] * 8, [coin] * 8))) == 1
