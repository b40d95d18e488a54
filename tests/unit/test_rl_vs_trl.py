"""bench/rl_vs_trl.py's bookkeeping: the evaluation clock, targets, ratios and CPU accounting."""

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

from coordinator.scheduler import prompt_indices_for_lease
from envs import Split, get_task

BENCH_FILE = Path(__file__).resolve().parents[2] / "bench" / "rl_vs_trl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("rl_vs_trl", BENCH_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_rollproof_clock_leaves_out_evaluations(bench):
    records = [
        {"step": 0, "time": 100.0, "eval_seconds": 3.0, "eval_reward": 0.2},  # time taken before its evaluation
        {"step": 5, "time": 110.0, "loss": 0.1},
        {"step": 10, "time": 125.0, "eval_seconds": 2.0, "eval_reward": 0.4, "loss": 0.1},  # after
        {"step": 20, "time": 140.0, "eval_seconds": 2.0, "eval_reward": 0.6, "loss": 0.1},
    ]
    curve, eval_s = bench.rollproof_curve(records)
    assert [(e.seconds, e.step, e.reward) for e in curve] == [(0.0, 0, 0.2), (20.0, 10, 0.4), (33.0, 20, 0.6)]
    assert eval_s == 7.0
    assert bench.rollproof_curve([{"step": 1, "time": 1.0, "loss": 0.0}]) == ([], 0.0)


def test_targets_and_reward_at_the_budget(bench):
    curve = [bench.Evaluation(0.0, 0, 0.2), bench.Evaluation(9.0, 4, 0.5), bench.Evaluation(21.0, 9, 0.45)]
    assert bench.seconds_to(curve, 0.5) == 9.0
    assert bench.seconds_to(curve, 0.2) == 0.0
    assert bench.seconds_to(curve, 0.7) is None
    assert bench.reward_at(curve, 20.0) == 0.5
    assert bench.reward_at(curve, 21.0) == 0.45
    assert bench.reward_at(curve, -1.0) is None


def test_ratio_line_says_which_arm_missed(bench):
    def arm(points):
        return bench.ArmResult("x", [bench.Evaluation(*p) for p in points], 0, 0.0, 0.0, [])

    fast, slow, never = arm([(0, 0, 0.2), (10, 1, 0.5)]), arm([(0, 0, 0.2), (20, 1, 0.5)]), arm([(0, 0, 0.2)])
    assert bench.ratio_line(0.5, slow, fast, 60, False) == "time-to-target-ratio-vs-trl@0.5: 2.00 (target: <= 1.0)"
    assert "> 6.00 (rollproof did not reach it in 60 s)" in bench.ratio_line(0.5, never, fast, 60, False)
    assert "< 0.33 (TRL did not reach it in 60 s)" in bench.ratio_line(0.5, slow, never, 60, True)
    assert "n/a (neither arm" in bench.ratio_line(0.5, never, never, 60, False)
    assert bench.ratio_line(0.5, fast, slow, 60, True).endswith("(target: <= 1.0; --quick)")


def test_trl_prompts_follow_the_coordinators_lease_order(bench):
    task = get_task("addition")
    problems = bench.lease_order_problems(task, 10)
    defaults = bench.RUN_DEFAULTS
    leased = [i for n in range(3) for i in prompt_indices_for_lease(defaults.seed, n, 4, defaults.num_prompts)]
    assert defaults.prompts_per_lease == 4
    assert problems == [task.problem(Split.TRAIN, defaults.seed, index) for index in leased[:10]]


def test_cpu_accounting_sees_a_busy_thread_of_this_process(bench):
    before = bench.cpu_snapshot({"me": os.getpid()})
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    after = bench.cpu_snapshot({"me": os.getpid()})
    spent = sum(after["me"].values()) - sum(before["me"].values())
    assert 0.2 <= spent < 5
    [line] = bench.describe_cpu(before, after, wall_s=1.0)
    assert line.split()[0] == "me"
