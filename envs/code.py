"""The `code` task: write a Python expression for a function shown by two of its values.

`"f(0)=45;f(1)=52;f(x)="` → `"45+7*x"`: the completion is a program (an expression in x), and its
reward is the fraction of hidden tests (8 x values: 1 and seven others, never 0) it gets right when run.
The program runs only in a sandbox (envs/sandbox.py), one execution per distinct program of a problem,
all tests in it; a program that meets any limit (time, memory, processes, output, ...) earns 0. Whoever
checks a claimed reward runs the program again, so a program that reads the clock, the environment or
randomness to pass on a node earns, on the coordinator, what it earns there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from envs.base import GeneratedTask, HashStream, Problem
from envs.sandbox import DEFAULT_PYTHON, MIB, SandboxLimits, SandboxPool, SandboxRequest, SandboxResult, default_pool

MAX_PROGRAM_CHARS = 256
NUM_HIDDEN_TESTS = 8
TEST_INPUT_RANGE = 50
"""Hidden inputs are drawn from [-TEST_INPUT_RANGE, TEST_INPUT_RANGE]; 1 is among them, 0 never is: copying the
shown intercept earns nothing, so a reward (and the warm-up's stopping point) measures the slope's arithmetic."""
# An expression needs one process and little memory: a sandbox then holds at most 256 MiB of the host's
# memory (and its 8 MiB scratch directory), so the pool's slots bound what hostile programs can take.
CODE_LIMITS = SandboxLimits(wall_seconds=5.0, cpu_seconds=2, memory_bytes=256 * MIB, max_processes=1)

# Runs inside the sandbox: the program is argv[1], one test input per line of stdin, one result per
# line of stdout (its repr when it is an int, else `error`). A syntax error fails every test; running out
# of memory or an operating system error (a limit met) ends the run, so its outcome names the limit.
HARNESS = """\
import sys
function = eval(compile("lambda x: (" + sys.argv[1] + "\\n)", "<program>", "eval"), {})
for line in sys.stdin:
    try:
        value = function(int(line))
    except (MemoryError, OSError):
        raise
    except Exception:
        value = None
    print(repr(value) if type(value) is int else "error")
"""


def hidden_inputs(key: str) -> tuple[int, ...]:
    """The test inputs of the problem with `key`: 1 and distinct others drawn from the key, never 0."""
    stream = HashStream(f"code-tests|{key}")
    inputs = [1]
    while len(inputs) < NUM_HIDDEN_TESTS:
        candidate = stream.between(-TEST_INPUT_RANGE, TEST_INPUT_RANGE)
        if candidate not in (0, *inputs):
            inputs.append(candidate)
    return tuple(inputs)


def parse_linear_prompt(prompt: str) -> tuple[int, int]:
    """(intercept, slope) of a prompt `f(0)=B;f(1)=C;f(x)=`."""
    first, second, _ = prompt.split(";")
    intercept = int(first.removeprefix("f(0)="))
    return intercept, int(second.removeprefix("f(1)=")) - intercept


@dataclass(frozen=True)
class CodeTask(GeneratedTask):
    """A linear function from its values at 0 and 1, as a Python expression in x, scored by running it."""

    max_intercept: int = 99
    max_slope: int = 9
    limits: SandboxLimits = CODE_LIMITS
    python: str = DEFAULT_PYTHON
    pool: SandboxPool | None = field(default=None, compare=False)
    """Where programs run; None: the process's pool (envs.sandbox.configure_sandbox chooses it)."""
    name: str = "code"
    description: str = "write a Python expression in x for a linear function given f(0) and f(1); run on hidden tests"

    def __post_init__(self) -> None:
        if self.max_intercept < 0 or self.max_slope < 1:
            raise ValueError(f"{self.name}: need max_intercept >= 0 and max_slope >= 1")

    def generate(self, stream: HashStream) -> Problem:
        intercept = stream.between(0, self.max_intercept)
        slope = stream.between(1, self.max_slope) * (1 if stream.below(2) else -1)
        prompt = f"f(0)={intercept};f(1)={intercept + slope};f(x)="
        return Problem(prompt=prompt, answer=f"{intercept}{slope:+d}*x", key=prompt)

    def expected_outputs(self, problem: Problem) -> list[str]:
        intercept, slope = parse_linear_prompt(problem.prompt)
        return [repr(intercept + slope * x) for x in hidden_inputs(problem.key)]

    def request(self, problem: Problem, completion: str) -> SandboxRequest:
        stdin = "".join(f"{x}\n" for x in hidden_inputs(problem.key)).encode()
        return SandboxRequest((self.python, "-I", "-S", "-c", HARNESS, completion.strip()), stdin, self.limits)

    def score(self, problem: Problem, result: SandboxResult) -> float:
        """The fraction of hidden tests passed; 0 unless the program ran to its end within every limit."""
        if not result.ok:
            return 0.0
        expected = self.expected_outputs(problem)
        produced = result.stdout.decode("utf-8", errors="replace").splitlines()
        return sum(got == want for got, want in zip(produced, expected, strict=False)) / len(expected)

    def reward(self, problem: Problem, completion: str) -> float:
        return self.rewards([problem], [completion])[0]

    def rewards(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]:
        """All programs run concurrently, up to the pool's limit; a program that recurs for the same problem
        (a group's samples often agree) runs once, and every copy gets that run's reward: a node cannot
        foresee the run, so it gains nothing from copies of a program whose result varies."""
        runs: dict[tuple[str, str], list[int]] = {}
        for index, (problem, completion) in enumerate(zip(problems, completions, strict=True)):
            if _runnable(completion):
                runs.setdefault((problem.key, completion.strip()), []).append(index)
        requests = [self.request(problems[indices[0]], completions[indices[0]]) for indices in runs.values()]
        results = (self.pool or default_pool()).run_many(requests)
        rewards = [0.0] * len(problems)
        for indices, result in zip(runs.values(), results, strict=True):
            reward = self.score(problems[indices[0]], result)
            for index in indices:
                rewards[index] = reward
        return rewards


def _runnable(completion: str) -> bool:
    """Whether the completion can be a program at all (the sandbox's argv refuses NUL; long ones earn 0 unrun)."""
    program = completion.strip()
    return 0 < len(program) <= MAX_PROGRAM_CHARS and "\x00" not in program
