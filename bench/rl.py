"""Asynchronous against synchronous RL (issue 6): wall-clock time to a held-out reward target with
the trainer's staleness bound k = 2 against k = 0.

Each arm runs the real one-machine loop (rollproof.up.Launcher: coordinator with its validator,
trainer and N nodes as child processes on loopback) on the same model, task and settings, except
the trainer's `max_staleness`. An arm ends when the published policy's held-out reward reaches the
target (the first evaluation's reward + --gain) or after --budget-s seconds of training. The
trainer's metrics.jsonl gives, per arm: time to target, steps, trainer tokens/s, and the mean time a
step waited for rollouts against the time it trained.

`async-speedup-ratio` is async ÷ sync time to target when both arms reach it. When either does not,
it is async ÷ sync time per trainer step over the budget, and the line says so: with equal
progress per step that is the same ratio, but progress per step is what k changes, so only the
first form is the issue's figure.
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

from rollproof.up import Launcher, UpOptions, as_set_flags  # noqa: E402


@dataclass(frozen=True)
class ArmResult:
    max_staleness: int
    num_steps: int
    train_seconds: float
    seconds_to_target: float | None
    first_reward: float
    best_reward: float
    tokens_per_second: float
    mean_wait_seconds: float
    mean_step_seconds: float

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(1, self.num_steps)


def run_arm(model: Path, task: str, max_staleness: int, args: argparse.Namespace, run_dir: Path) -> ArmResult:
    trainer_settings = [
        f"max_staleness={max_staleness}", f"eval_every={args.eval_every}", f"eval_problems={args.eval_problems}",
        *([f"groups_per_step={args.groups_per_step}"] if args.groups_per_step else []),
    ]
    launcher = Launcher(UpOptions(
        model=model, task=task, num_nodes=args.nodes, num_steps=0, run_dir=run_dir,
        extra_trainer=as_set_flags(trainer_settings),
    ))
    target = None
    started = None
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
        max_staleness=max_staleness,
        num_steps=len(steps),
        train_seconds=last_time - first_time,
        seconds_to_target=reached,
        first_reward=curve[0][2],
        best_reward=max(reward for _, _, reward in curve),
        tokens_per_second=statistics.fmean(r["tokens_per_second"] for r in trained) if trained else 0.0,
        mean_wait_seconds=statistics.fmean(r["wait_seconds"] for r in steps) if steps else 0.0,
        mean_step_seconds=statistics.fmean(r["step_seconds"] for r in steps) if steps else 0.0,
    )


def describe(arm: ArmResult) -> str:
    reached = f"{arm.seconds_to_target:.0f} s" if arm.seconds_to_target is not None else "not reached"
    return (f"k={arm.max_staleness}: {arm.num_steps} steps in {arm.train_seconds:.0f} s "
            f"({arm.seconds_per_step:.2f} s/step), held-out {arm.first_reward:.3f} -> best {arm.best_reward:.3f}, "
            f"target {reached}; trainer {arm.tokens_per_second:,.0f} tokens/s, per step "
            f"{arm.mean_wait_seconds:.2f} s waiting for rollouts vs {arm.mean_step_seconds:.2f} s training")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short arms (under a minute in all)")
    parser.add_argument("--model", type=Path, help="model directory (default: the bootstrapped tiny model)")
    parser.add_argument("--task", default="addition")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gain", type=float, default=0.1, help="target = first held-out reward + gain")
    parser.add_argument("--budget-s", type=float, help="training seconds per arm (default 600, quick 8)")
    parser.add_argument("--groups-per-step", type=int, help="default: the embedded run's (rollproof.up)")
    parser.add_argument("--eval-every", type=int, help="trainer steps between evaluations (default 5, quick 2)")
    parser.add_argument("--eval-problems", type=int, help="held-out problems per evaluation (default 200, quick 30)")
    parser.add_argument("--startup-timeout-s", type=float, default=120)
    args = parser.parse_args()
    args.budget_s = args.budget_s or (8 if args.quick else 600)
    args.eval_every = args.eval_every or (2 if args.quick else 5)
    args.eval_problems = args.eval_problems or (30 if args.quick else 200)
    if args.model is None:
        from policy.bootstrap import bootstrapped_model_dir

        args.model = bootstrapped_model_dir(args.task)

    with tempfile.TemporaryDirectory(prefix="rollproof-bench-rl-") as scratch:
        arms = {k: run_arm(args.model, args.task, k, args, Path(scratch) / f"k{k}") for k in (2, 0)}
    async_arm, sync_arm = arms[2], arms[0]
    print(f"model {args.model}, task {args.task}, {args.nodes} nodes, {args.groups_per_step or 'embedded'} groups a step, "
          f"target = first held-out reward + {args.gain}, budget {args.budget_s:.0f} s an arm")
    for arm in (async_arm, sync_arm):
        print(describe(arm))
    if async_arm.seconds_to_target is not None and sync_arm.seconds_to_target is not None:
        ratio = async_arm.seconds_to_target / max(sync_arm.seconds_to_target, 1e-9)
        print(f"async-speedup-ratio: {ratio:.3f} (target: <= 0.7; time to held-out target, k=2 / k=0)")
    else:
        ratio = async_arm.seconds_per_step / sync_arm.seconds_per_step
        print(f"async-speedup-ratio: {ratio:.3f} (target: <= 0.7; time per trainer step, k=2 / k=0: "
              f"the held-out target was not reached by both arms)")


if __name__ == "__main__":
    main()
