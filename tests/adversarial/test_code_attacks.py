"""Attacks on the `code` task (issue 20), against a real coordinator that re-executes every submitted
program in its sandbox: a node that claims a reward its program does not earn, and one whose program
passes where the node ran it but behaves differently on the coordinator (it reads the environment, the
clock, randomness). Each forged rollout is dressed as an honest node would report it (log-probabilities
and commitment from a prefill on the trusted model), so only the re-execution can catch it; each is
rejected with reward_mismatch, and none of the attacker's groups can be trained on."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import pytest

from envs.base import Problem, Split
from envs.code import hidden_inputs, parse_linear_prompt
from tests.adversarial.harness import MARGINS, Attacker, rebuilt_batch, rejected_reasons, run, trainable_groups
from tests.integration.cluster import checking_cluster
from tests.unit.test_sandbox import bubblewrap_or_skip

# Long enough for the forged programs (up to ~80 characters, one token each) after a prompt, within the
# tiny model's 128 positions.
MAX_TOKENS = 96
NODE_ONLY_VARIABLE = "ROLLPROOF_ON_THE_NODE"
MAX_LUCKY_TRIES = 1_000_000
# How long a clock-reading program passes after it was forged: the node checked it before, the
# coordinator runs it after.
CLOCK_WINDOW_S = 1.0


@pytest.fixture(scope="module")
def code_cluster(tmp_path_factory, tiny_model):
    bubblewrap_or_skip()
    with checking_cluster(
        tmp_path_factory.mktemp("code-attacks"),
        tiny_model,
        "run.task=code",
        "run.group_size=2",
        f"run.sampling.max_tokens={MAX_TOKENS}",
    ) as cluster:
        yield cluster


def passes_every_test(problem: Problem, program: str, num_tries: int = 1) -> bool:
    """Whether `program` gives the right value at every hidden input in one of `num_tries` runs, evaluated
    in this process: where the node ran it, under whatever condition it reads."""
    intercept, slope = parse_linear_prompt(problem.prompt)
    function = eval(f"lambda x: ({program})", {})
    inputs = hidden_inputs(problem.key)
    return any(all(function(x) == intercept + slope * x for x in inputs) for _ in range(num_tries))


@dataclasses.dataclass(frozen=True)
class Forgery:
    program: str
    claimed_reward: float
    passes_on_the_node: bool | None = None
    """For a program that reads its surroundings: whether it earned the claim where the node ran it."""
    submit_after: float = 0.0
    """time.time() before which the submission must not leave."""


def fails_its_tests(problem: Problem) -> Forgery:
    return Forgery("1/0", 1.0)


def never_ends(problem: Problem) -> Forgery:
    return Forgery("any(iter(int,1))", 1.0)


def claims_more_than_partial_credit(problem: Problem) -> Forgery:
    """Right where x > 0 only: about half of the hidden tests."""
    intercept, slope = parse_linear_prompt(problem.prompt)
    return Forgery(f"{intercept}+{slope}*abs(x)", 1.0)


def reads_the_environment(problem: Problem) -> Forgery:
    program = f"({problem.answer})if __import__('os').getenv('{NODE_ONLY_VARIABLE}')=='1' else None"
    os.environ[NODE_ONLY_VARIABLE] = "1"
    try:
        return Forgery(program, 1.0, passes_every_test(problem, program))
    finally:
        del os.environ[NODE_ONLY_VARIABLE]


def reads_the_clock(problem: Problem) -> Forgery:
    deadline = time.time() + CLOCK_WINDOW_S
    program = f"({problem.answer})if __import__('time').time()<{deadline!r} else None"
    return Forgery(program, 1.0, passes_every_test(problem, program), submit_after=deadline)


def reads_randomness(problem: Problem) -> Forgery:
    """Right at each input with probability 1/4: the node re-runs it until a run passes every test (about
    4**8 tries) and claims that run; a re-execution passes with probability 4**-8."""
    program = f"({problem.answer})if __import__('random').random()<0.25 else None"
    return Forgery(program, 1.0, passes_every_test(problem, program, MAX_LUCKY_TRIES))


ATTACKS: dict[str, Callable[[Problem], Forgery]] = {
    "20-code-fails-its-tests": fails_its_tests,
    "20-code-never-ends": never_ends,
    "20-code-claims-more-than-partial-credit": claims_more_than_partial_credit,
    "20-code-reads-the-environment": reads_the_environment,
    "20-code-reads-the-clock": reads_the_clock,
    "20-code-reads-randomness": reads_randomness,
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_reward_the_program_does_not_earn_on_the_coordinator_is_rejected(code_cluster, trusted, attack):
    """Rollout 0 of every leased group is the forged program claiming its reward; the rest are honest."""
    model, tokenizer = trusted

    async def scenario():
        attacker = await Attacker(code_cluster, model, tokenizer).start()
        lease = await attacker.lease()
        honest = attacker.generate(lease)
        problems = [
            attacker.task.problem(Split.TRAIN, attacker.run_info.run_seed, prompt.prompt_index)
            for prompt in lease.prompts
        ]
        forgeries = [ATTACKS[attack](problem) for problem in problems]
        completions = [
            [
                (*tokenizer.encode(forgery.program, add_special_tokens=False), tokenizer.eos_token_id),
                *(rollout.token_ids for rollout in group.rollouts[1:]),
            ]
            for forgery, group in zip(forgeries, honest.groups, strict=True)
        ]
        dressed = rebuilt_batch(attacker, model, lease, completions)
        groups = tuple(
            dataclasses.replace(
                group,
                rollouts=(
                    dataclasses.replace(group.rollouts[0], claimed_reward=forgery.claimed_reward),
                    *group.rollouts[1:],
                ),
            )
            for group, forgery in zip(dressed.groups, forgeries, strict=True)
        )
        time.sleep(max(0.0, max(f.submit_after for f in forgeries) - time.time()))
        receipt = await attacker.submit(dataclasses.replace(dressed, groups=groups))
        await attacker.close()
        return attacker, forgeries, receipt

    attacker, forgeries, receipt = run(scenario())
    assert all(f.passes_on_the_node in (None, True) for f in forgeries), forgeries
    assert receipt.num_accepted == 0, receipt
    assert rejected_reasons(receipt) == {"REWARD_MISMATCH"}, receipt
    forged = [v for v in receipt.verdicts if v.sample_index == 0]
    assert len(forged) == len(forgeries)
    for verdict, forgery in zip(forged, forgeries, strict=True):
        assert verdict.message.startswith(f"claimed reward {forgery.claimed_reward:g}, the task's verifier gives")
    assert trainable_groups(code_cluster, attacker.node_id) == 0
    MARGINS[attack] = {"check": "REWARD_MISMATCH", "exact": True}
