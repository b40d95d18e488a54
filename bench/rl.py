"""Asynchronous against synchronous RL (issue 6): wall-clock time to a held-out reward target with
the trainer's staleness bound k = 2 against k = 0.

Each arm runs the real one-machine loop (rollproof.launcher.Launcher: coordinator with its validator,
trainer and N nodes as child processes on loopback) on the same model, task and settings, except
the trainer's `max_staleness`. An arm ends when the published policy's held-out reward reaches the
target (the first evaluation's reward + --gain) or after --budget-s seconds of training. The
trainer's metrics.jsonl gives, per arm: time to target, steps, trainer tokens/s, and the mean time a
step waited for rollouts against the time it trained.

`async-speedup-ratio` is async ÷ sync time to target when both arms reach it. When either does not,
it is async ÷ sync time per trainer step over the budget, and the line says so: with equal
progress per step that is the same ratio, but progress per step is what k changes, so only the
first form is the issue's figure.

`--compare probation` runs instead two arms that differ only in the coordinator's
`validation.probation_tokens` (the default against 0: issue 16's probation, where a new node's groups
are trainable only after its first node-level verdict). Its cost is the later first trainer step; it
prints both arms' time to the target and `probation-cost-ratio` (with ÷ without probation, on time to
target when both reach it, else on the time to the first trainer step). One pair of runs is noisy: the
nodes' rollouts, the held-out evaluations and other load on the machine all move it.

`--compare difficulty` runs two arms on a training set small enough that prompts repeat
(`--num-prompts`, default 1,024: an epoch every ~16 steps of 64 groups), with the pass-rate buffer
(coordinator/difficulty.py: prompts last seen all solved or all failed carried by a quarter of the
leases, `run.keep_solved_or_failed=0.25`) and without it (1.0, the default). It prints each arm's
share of uninformative groups (equal rewards, skipped by the trainer) and `difficulty-filter-ratio`
(with ÷ without, on time to target when both reach it, else on time per step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rollproof.launcher import Launcher, UpOptions, as_set_flags  # noqa: E402


@dataclass(frozen=True)
class Arm:
    """What one arm changes: the trainer's staleness bound, and coordinator settings."""

    label: str
    max_staleness: int = 2
    coordinator_settings: tuple[str, ...] = ()


STALENESS_ARMS = (Arm("k=2", 2), Arm("k=0", 0))
PROBATION_ARMS = (Arm("probation"), Arm("probation_tokens=0", coordinator_settings=("validation.probation_tokens=0",)))


BUFFER_KEEP_FRACTION = 0.25


def difficulty_arms(num_prompts: int) -> tuple[Arm, Arm]:
    prompts = f"run.num_prompts={num_prompts}"
    return (
        Arm("pass-rate buffer", coordinator_settings=(prompts, f"run.keep_solved_or_failed={BUFFER_KEEP_FRACTION}")),
        Arm("keep_solved_or_failed=1", coordinator_settings=(prompts, "run.keep_solved_or_failed=1")),
    )


@dataclass(frozen=True)
class ArmResult:
    arm: Arm
    num_steps: int
    train_seconds: float
    seconds_to_first_step: float  # from the first held-out evaluation (the trainer's start) to its first step
    seconds_from_launch_to_first_step: float  # from starting the coordinator to the trainer's first step
    seconds_to_target: float | None
    first_reward: float
    best_reward: float
    tokens_per_second: float
    mean_wait_seconds: float
    mean_step_seconds: float
    uninformative_share: float  # of the groups the trainer drew: equal rewards, skipped

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(1, self.num_steps)

    @property
    def steps_per_second(self) -> float:
        return self.num_steps / self.train_seconds if self.train_seconds > 0 else 0.0


def run_arm(model: Path, task: str, arm: Arm, args: argparse.Namespace, run_dir: Path) -> ArmResult:
    trainer_settings = [
        f"max_staleness={arm.max_staleness}",
        f"eval_every={args.eval_every}",
        f"eval_problems={args.eval_problems}",
        *([f"groups_per_step={args.groups_per_step}"] if args.groups_per_step else []),
    ]
    launcher = Launcher(
        UpOptions(
            model=model,
            task=task,
            num_nodes=args.nodes,
            num_steps=0,
            run_dir=run_dir,
            extra_trainer=as_set_flags(trainer_settings),
            extra_coordinator=as_set_flags(list(arm.coordinator_settings)),
        )
    )
    target = None
    started = None
    launched = time.time()  # the trainer's metrics are stamped with time.time()
    try:
        launcher.start()
        deadline = time.monotonic() + args.startup_timeout_s
        while True:
            for child in launcher.children:
                if child.popen.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with {child.popen.returncode}; see {child.log_path}")
            curve = launcher.eval_curve()
            if curve and started is None:
                started = time.monotonic()
                target = curve[0][2] + args.gain
            if started is None and time.monotonic() > deadline:
                raise RuntimeError(f"no first evaluation within {args.startup_timeout_s} s; see {run_dir / 'logs'}")
            if started is not None and (curve[-1][2] >= target or time.monotonic() - started > args.budget_s):
                break
            time.sleep(0.5)
    finally:
        launcher.stop()
    records = launcher.metrics()
    curve = launcher.eval_curve()
    steps = [r for r in records if "loss" in r]
    reached = next((seconds for _, seconds, reward in curve if reward >= target), None)
    last_time = max(r["time"] for r in records)
    first_time = records[0]["time"]
    trained = [r for r in steps if not r.get("skipped")]
    return ArmResult(
        arm=arm,
        num_steps=len(steps),
        train_seconds=last_time - first_time,
        seconds_to_first_step=steps[0]["time"] - first_time if steps else last_time - first_time,
        seconds_from_launch_to_first_step=(steps[0]["time"] if steps else last_time) - launched,
        seconds_to_target=reached,
        first_reward=curve[0][2],
        best_reward=max(reward for _, _, reward in curve),
        tokens_per_second=statistics.fmean(r["tokens_per_second"] for r in trained) if trained else 0.0,
        mean_wait_seconds=statistics.fmean(r["wait_seconds"] for r in steps) if steps else 0.0,
        mean_step_seconds=statistics.fmean(r["step_seconds"] for r in steps) if steps else 0.0,
        uninformative_share=sum(r.get("num_groups_uninformative", 0) for r in steps)
        / max(1, sum(r.get("num_groups", 0) for r in steps)),
    )


def describe(arm: ArmResult) -> str:
    reached = f"{arm.seconds_to_target:.0f} s" if arm.seconds_to_target is not None else "not reached"
    return (
        f"{arm.arm.label}: {arm.num_steps} steps in {arm.train_seconds:.0f} s "
        f"({arm.seconds_per_step:.2f} s/step, {arm.steps_per_second:.2f} steps/s; first step after "
        f"{arm.seconds_to_first_step:.1f} s, {arm.seconds_from_launch_to_first_step:.1f} s after launch), "
        f"held-out {arm.first_reward:.3f} -> best {arm.best_reward:.3f}, "
        f"target {reached}; trainer {arm.tokens_per_second:,.0f} tokens/s, per step "
        f"{arm.mean_wait_seconds:.2f} s waiting for rollouts vs {arm.mean_step_seconds:.2f} s training; "
        f"{arm.uninformative_share:.0%} of groups uninformative"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short arms (under a minute in all)")
    parser.add_argument("--model", type=Path, help="model directory (default: the bootstrapped tiny model)")
    parser.add_argument("--task", default="addition")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gain", type=float, default=0.1, help="target = first held-out reward + gain")
    parser.add_argument("--budget-s", type=float, help="training seconds per arm (default 600, quick 8)")
    parser.add_argument("--groups-per-step", type=int, help="default: the embedded run's (rollproof.launcher)")
    parser.add_argument("--eval-every", type=int, help="trainer steps between evaluations (default 5, quick 2)")
    parser.add_argument("--eval-problems", type=int, help="held-out problems per evaluation (default 200, quick 30)")
    parser.add_argument("--startup-timeout-s", type=float, default=120)
    parser.add_argument(
        "--compare",
        choices=("staleness", "probation", "difficulty"),
        default="staleness",
        help="staleness: k=2 against k=0 (async-speedup-ratio); probation: the default "
        "validation.probation_tokens against 0 (probation-cost-ratio); difficulty: the pass-rate buffer "
        "against none, on --num-prompts prompts (difficulty-filter-ratio)",
    )
    parser.add_argument("--num-prompts", type=int, default=1024, help="training prompts for --compare difficulty")
    args = parser.parse_args()
    args.budget_s = args.budget_s or (8 if args.quick else 600)
    args.eval_every = args.eval_every or (2 if args.quick else 5)
    args.eval_problems = args.eval_problems or (30 if args.quick else 200)
    if args.model is None:
        from policy.bootstrap import bootstrapped_model_dir

        args.model = bootstrapped_model_dir(args.task)

    arms = {
        "staleness": STALENESS_ARMS,
        "probation": PROBATION_ARMS,
        "difficulty": difficulty_arms(args.num_prompts),
    }[args.compare]
    with tempfile.TemporaryDirectory(prefix="rollproof-bench-rl-") as scratch:
        results = [run_arm(args.model, args.task, arm, args, Path(scratch) / f"arm{i}") for i, arm in enumerate(arms)]
    print(
        f"model {args.model}, task {args.task}, {args.nodes} nodes, "
        f"{args.groups_per_step or 'embedded'} groups a step, "
        f"target = first held-out reward + {args.gain}, budget {args.budget_s:.0f} s an arm"
    )
    for result in results:
        print(describe(result))
    if args.compare == "staleness":
        print_async_speedup(*results)
    elif args.compare == "probation":
        print_probation_cost(*results)
    else:
        print_difficulty_filter(*results)


def print_async_speedup(async_arm: ArmResult, sync_arm: ArmResult) -> None:
    if async_arm.seconds_to_target is not None and sync_arm.seconds_to_target is not None:
        ratio = async_arm.seconds_to_target / max(sync_arm.seconds_to_target, 1e-9)
        print(f"async-speedup-ratio: {ratio:.3f} (target: <= 0.7; time to held-out target, k=2 / k=0)")
    else:
        ratio = async_arm.seconds_per_step / max(sync_arm.seconds_per_step, 1e-9)
        print(
            f"async-speedup-ratio: {ratio:.3f} (target: <= 0.7; time per trainer step, k=2 / k=0: "
            f"the held-out target was not reached by both arms)"
        )


def print_probation_cost(with_probation: ArmResult, without: ArmResult) -> None:
    if with_probation.seconds_to_target is not None and without.seconds_to_target is not None:
        ratio = with_probation.seconds_to_target / max(without.seconds_to_target, 1e-9)
        print(f"probation-cost-ratio: {ratio:.3f} (time to held-out target, probation / probation_tokens=0)")
    else:
        ratio = with_probation.seconds_to_first_step / max(without.seconds_to_first_step, 1e-9)
        print(
            f"probation-cost-ratio: {ratio:.3f} (time to the first trainer step, probation / probation_tokens=0: "
            f"the held-out target was not reached by both arms)"
        )


def print_difficulty_filter(with_buffer: ArmResult, without: ArmResult) -> None:
    for arm in (with_buffer, without):
        print(f"uninformative-share {arm.arm.label}: {arm.uninformative_share:.3f}")
    if with_buffer.seconds_to_target is not None and without.seconds_to_target is not None:
        ratio = with_buffer.seconds_to_target / max(without.seconds_to_target, 1e-9)
        print(f"difficulty-filter-ratio: {ratio:.3f} (target: < 1; time to held-out target, buffer / none)")
    elif not (with_buffer.num_steps and without.num_steps):
        print("difficulty-filter-ratio: n/a (target: < 1; an arm made no trainer step within its budget)")
    else:
        ratio = with_buffer.seconds_per_step / max(without.seconds_per_step, 1e-9)
        print(
            f"difficulty-filter-ratio: {ratio:.3f} (target: < 1; time per trainer step, buffer / none: "
            "the held-out target was not reached by both arms)"
        )


if __name__ == "__main__":
    main()
