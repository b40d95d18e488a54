"""rollproof against TRL (issue 19): wall-clock time to held-out reward targets on one machine,
TRL's GRPOTrainer (one process) against `rollproof up` (coordinator with its validator, trainer and
two nodes as child processes), one arm after the other.

Both arms start from the same model directory (by default the bootstrapped tiny model), train on
the same task's training prompts in the coordinator's lease order, and are evaluated with the same
code (`policy.evaluate.evaluate`: greedy, the first 200 held-out problems of the run seed, 32 tokens).
The settings TRL has are set alike: G = 8, 64 prompts a step, AdamW lr 3e-4 constant, clip 1.0,
T = 1, 32 completion tokens, no KL, advantages not divided by the group's std (`scale_rewards="none"`),
token-level loss (`loss_type="dapo"`), float32. The TRL arm evaluates its weights every ~10 s of wall
time from a callback; the rollproof trainer evaluates its published policy every 10 steps. Evaluation
time is excluded from both arms' clocks (rollproof's nodes keep generating while its trainer
evaluates; TRL stands still). The TRL arm runs in a child process of this script; before it trains it
checks that its prompts, prompt token ids and rewards equal rollproof's, and the run stops if not.

Needs the optional `bench` extra (trl). Prints each arm's time to each target and reward at the
budget, CPU seconds per process of the rollproof arm, then the `time-to-target-ratio-vs-trl` lines
(rollproof ÷ TRL). On a machine other work keeps busy, torch's two threads in the TRL arm wait on
each other for most of each step (4-8x slower here): `--trl-threads 1` keeps that arm meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The repository root before bench/, whose coordinator.py would shadow the coordinator package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.config import RunSection  # noqa: E402
from coordinator.scheduler import prompt_indices_for_lease  # noqa: E402
from envs import Problem, Split, Task, get_task  # noqa: E402
from policy.evaluate import evaluate  # noqa: E402
from policy.scoring import completion_text  # noqa: E402
from policy.tokenizer import load_tokenizer  # noqa: E402
from rollproof.launcher import EMBEDDED_PROMPTS_PER_LEASE, EMBEDDED_TRAINER_SETTINGS, Launcher, UpOptions  # noqa: E402

GROUP_SIZE = 8
PROMPTS_PER_STEP = 64
LEARNING_RATE = 3e-4
GRAD_CLIP = 1.0
TEMPERATURE = 1.0
MAX_TOKENS = 32
EVAL_PROBLEMS = 200
EVAL_INTERVAL_S = 10.0
NUM_PARITY_PROMPTS = 64
RUN_DEFAULTS = RunSection()
CANNOT_BE_EQUAL = [
    "sampling noise: TRL draws with torch.multinomial inside HF generate; rollproof nodes use the seeded Gumbel "
    "rule with per-lease seeds, so the two arms draw different completions",
    "sampling weights: rollproof nodes sample from the bf16-rounded published policy, TRL from its float32 "
    "weights; rollproof evaluates the published bf16 policy, TRL its float32 weights",
    "staleness: rollproof trains on groups up to k = 2 versions old, importance-weighted against the node's "
    "log-probabilities with tokens outside [0.5, 2] masked; TRL is on-policy (ratio 1: its eps = 0.2 clip is inert)",
    "uninformative groups (all rewards equal): rollproof skips their forward and backward (their gradient is "
    "zero), TRL runs them; both count their tokens in the token mean (dapo), so the losses are alike",
    "prompt order: TRL takes the prompts in the coordinator's lease order; rollproof trains in the order "
    "groups arrive from two nodes",
    "threads: TRL is one process on torch's default threads; rollproof's trainer and nodes use one thread each "
    "beside the coordinator",
]


@dataclass(frozen=True)
class Evaluation:
    seconds: float  # wall time since training started, evaluations excluded
    step: int
    reward: float


def seconds_to(curve: list[Evaluation], target: float) -> float | None:
    return next((e.seconds for e in curve if e.reward >= target), None)


def reward_at(curve: list[Evaluation], seconds: float) -> float | None:
    """The reward of the last evaluation at or before `seconds`."""
    before = [e for e in curve if e.seconds <= seconds]
    return before[-1].reward if before else None


def lease_order_problems(task: Task, num_problems: int) -> list[Problem]:
    """The training problems in the order the coordinator leases them (lease numbers 0, 1, ...)."""
    per_lease = EMBEDDED_PROMPTS_PER_LEASE
    indices = [
        index
        for lease_number in range(-(-num_problems // per_lease))
        for index in prompt_indices_for_lease(RUN_DEFAULTS.seed, lease_number, per_lease, RUN_DEFAULTS.num_prompts)
    ]
    return [task.problem(Split.TRAIN, RUN_DEFAULTS.seed, index) for index in indices[:num_problems]]


def held_out_reward(model, tokenizer, task: Task) -> float:
    """The rollproof trainer's evaluation (trainer/main.py PublishedPolicyEvaluator), on any weights."""
    return evaluate(
        model.eval(), tokenizer, task, num_problems=EVAL_PROBLEMS, seed=RUN_DEFAULTS.seed, max_tokens=MAX_TOKENS
    ).mean_reward


# ---- CPU accounting (/proc) ----

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(path: Path) -> list[str] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...


def _cpu_seconds(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(entry / "stat")) is not None:
            parents[int(entry.name)] = int(fields[1])
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found.extend(frontier)
    return found


def cpu_snapshot(pids: dict[str, int]) -> dict[str, dict[int, float]]:
    """Per named process (with its descendants): CPU seconds of each thread so far."""
    snapshot = {}
    for name, pid in pids.items():
        threads = {}
        for member in _descendants(pid):
            for task_dir in Path(f"/proc/{member}/task").glob("*"):
                if (fields := _stat_fields(task_dir / "stat")) is not None:
                    threads[int(task_dir.name)] = _cpu_seconds(fields)
        snapshot[name] = threads
    return snapshot


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLOCK_TICKS, sum(values[:8]) / CLOCK_TICKS


def describe_cpu(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], wall_s: float) -> list[str]:
    lines = []
    for name, threads in after.items():
        deltas = sorted((s - before.get(name, {}).get(tid, 0.0) for tid, s in threads.items()), reverse=True)
        busy = [d for d in deltas if d > 0.01 * wall_s]
        lines.append(
            f"  {name:<12} {sum(deltas):7.1f} CPU s = {sum(deltas) / wall_s:.2f} cores; {len(threads)} threads, "
            f"{len(busy)} busy > 1%: " + ", ".join(f"{d:.1f}" for d in busy[:6])
        )
    return lines


# ---- the TRL arm (a child process: `--trl-worker`) ----


def check_parity(trainer, task: Task, tokenizer, problems: list[Problem]) -> dict:
    """Prompts, prompt token ids and rewards of TRL's code paths against rollproof's; raises on a difference."""
    expected = [p.prompt for p in problems[:NUM_PARITY_PROMPTS] for _ in range(GROUP_SIZE)]
    first_batch = next(iter(trainer.get_train_dataloader()))
    trl_prompts = [row["prompt"] for row in first_batch][: len(expected)]
    if trl_prompts != expected:
        raise AssertionError("TRL's first generation batch is not the coordinator's first leased prompts, G times")
    sample = problems[:NUM_PARITY_PROMPTS]
    trl_ids = trainer._tokenize_prompts([p.prompt for p in sample])[0]
    ours = [list(tokenizer.encode(p.prompt)) for p in sample]  # coordinator/core.py's LeasedPrompt token ids
    if [list(ids) for ids in trl_ids] != ours:
        raise AssertionError("TRL's prompt token ids differ from the coordinator's")
    completions = parity_completions(tokenizer, sample)
    trl_texts = trainer.processing_class.batch_decode([ids for _, ids in completions], skip_special_tokens=True)
    trl_rewards = reward_function(task)(
        prompts=[p.prompt for p, _ in completions],
        completions=trl_texts,
        answer=[p.answer for p, _ in completions],
        key=[p.key for p, _ in completions],
    )
    our_rewards = [task.reward(p, completion_text(tokenizer, ids)) for p, ids in completions]  # node and coordinator
    if trl_rewards != our_rewards:
        raise AssertionError("TRL's rewards differ from rollproof's on the same completions")
    return {
        "num_prompts": len(sample),
        "num_prompt_batch_rows": len(expected),
        "num_completions": len(completions),
        "num_reward_one": sum(r == 1.0 for r in our_rewards),
    }


def parity_completions(tokenizer, problems: list[Problem]) -> list[tuple[Problem, list[int]]]:
    """Per problem: the reference answer, the answer padded by a space and zeros, a wrong sum, noise
    (special tokens included), each with and without the final EOS."""
    rng = random.Random(0)
    eos = tokenizer.eos_token_id
    completions = []
    for problem in problems:
        texts = [problem.answer, f" 0{problem.answer}", str(int(problem.answer) + 1)]
        bodies = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
        bodies.append([rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, MAX_TOKENS))])
        completions.extend((problem, [*body, *tail]) for body in bodies for tail in ([eos], []))
    return completions


def reward_function(task: Task):
    def task_reward(prompts, completions, answer, key, **_):
        return [
            task.reward(Problem(*row), completion)
            for row, completion in zip(zip(prompts, answer, key, strict=True), completions, strict=True)
        ]

    return task_reward


def trl_worker(args: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    task = get_task(args.task)
    tokenizer = load_tokenizer(args.model)
    num_problems = PROMPTS_PER_STEP * int(args.budget_s * 4 + 16)  # well above TRL's steps in the budget
    problems = lease_order_problems(task, num_problems)
    dataset = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer, "key": p.key} for p in problems])
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    if args.trl_threads:
        torch.set_num_threads(args.trl_threads)
    report: dict = {"curve": [], "torch_threads": torch.get_num_threads()}

    def write_report() -> None:
        Path(args.report).write_text(json.dumps(report))

    class TimedGRPOTrainer(GRPOTrainer):
        """Adds up the seconds and tokens of generation."""

        generate_seconds = generate_cpu_seconds = 0.0
        num_completion_tokens = 0

        def _generate_single_turn(self, *a, **kw):
            started, cpu_started = time.perf_counter(), time.process_time()
            completion_ids, logprobs = super()._generate_single_turn(*a, **kw)
            TimedGRPOTrainer.generate_seconds += time.perf_counter() - started
            TimedGRPOTrainer.generate_cpu_seconds += time.process_time() - cpu_started
            TimedGRPOTrainer.num_completion_tokens += sum(len(ids) for ids in completion_ids)
            return completion_ids, logprobs

    class HeldOutEvaluation(TrainerCallback):
        def __init__(self) -> None:
            self.started = self.last = 0.0
            self.eval_seconds = 0.0

        def evaluate(self, model, step: int) -> None:
            now = time.perf_counter()
            reward = held_out_reward(model, tokenizer, task)
            model.train()
            report["curve"].append([now - self.started - self.eval_seconds, step, reward])
            self.last = time.perf_counter()
            self.eval_seconds += self.last - now
            report.update(
                eval_seconds=self.eval_seconds,
                num_steps=step,
                cpu_seconds=time.process_time(),
                generate_seconds=TimedGRPOTrainer.generate_seconds,
                generate_cpu_seconds=TimedGRPOTrainer.generate_cpu_seconds,
                num_completion_tokens=TimedGRPOTrainer.num_completion_tokens,
            )
            write_report()

        def on_train_begin(self, args_, state, control, model=None, **kwargs):
            self.started = time.perf_counter()
            report["cpu_seconds_at_start"] = time.process_time()
            self.evaluate(model, 0)

        def on_step_end(self, args_, state, control, model=None, **kwargs):
            if time.perf_counter() - self.last >= EVAL_INTERVAL_S:
                self.evaluate(model, state.global_step)
            if report["curve"][-1][0] >= args.budget_s:
                control.should_training_stop = True

    config = GRPOConfig(
        output_dir=str(Path(args.report).parent / "trl-output"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE,
        gradient_accumulation_steps=1,
        num_generations=GROUP_SIZE,
        shuffle_dataset=False,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=GRAD_CLIP,
        temperature=TEMPERATURE,
        top_k=0,
        top_p=1.0,
        max_completion_length=MAX_TOKENS,
        beta=0.0,
        scale_rewards="none",
        loss_type="dapo",
        max_steps=10**6,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = TimedGRPOTrainer(
        model=model,
        reward_funcs=reward_function(task),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[HeldOutEvaluation()],
    )
    report["parity"] = check_parity(trainer, task, tokenizer, problems)
    write_report()
    trainer.train()


@dataclass(frozen=True)
class ArmResult:
    name: str
    curve: list[Evaluation]
    num_steps: int
    train_seconds: float
    eval_seconds: float
    details: list[str]


def run_trl_arm(args: argparse.Namespace, scratch: Path) -> tuple[ArmResult, dict]:
    report_path = scratch / "trl.json"
    flags = {"report": report_path, "model": args.model, "task": args.task, "budget-s": args.budget_s}
    flags["trl-threads"] = args.trl_threads
    command = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", *(f"--{k}={v}" for k, v in flags.items())]
    with open(scratch / "trl.log", "wb") as log:
        worker = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        worker.wait(timeout=args.startup_timeout_s + 2 * args.budget_s)
    except subprocess.TimeoutExpired:
        print(f"TRL arm: still running after {args.startup_timeout_s + 2 * args.budget_s:.0f} s; stopped")
    finally:
        stop_by_pid(worker)
    if worker.returncode != 0 and not report_path.exists():
        raise RuntimeError(
            f"the TRL arm exited with {worker.returncode}; see {scratch / 'trl.log'}:\n"
            + (scratch / "trl.log").read_text()[-3000:]
        )
    report = json.loads(report_path.read_text())
    if "parity" not in report:
        raise RuntimeError(f"the TRL arm failed before its parity checks; see {scratch / 'trl.log'}")
    curve = [Evaluation(*point) for point in report["curve"]]
    if not curve:
        raise RuntimeError(f"the TRL arm made no evaluation; see {scratch / 'trl.log'}")
    train_s = curve[-1].seconds
    num_steps = report["num_steps"]
    generate_s, num_tokens = report["generate_seconds"], report["num_completion_tokens"]
    cpu_s = report["cpu_seconds"] - report["cpu_seconds_at_start"]
    details = [
        f"  {num_steps} steps in {train_s:.0f} s ({num_steps / max(train_s, 1e-9):.2f} steps/s); generation "
        f"{generate_s:.0f} s ({num_tokens / max(generate_s, 1e-9):,.0f} tokens/s, "
        f"{num_tokens / max(report['generate_cpu_seconds'], 1e-9):,.0f} per CPU s; HF generate at batch "
        f"{PROMPTS_PER_STEP * GROUP_SIZE}), the rest of the steps {train_s - generate_s:.0f} s; "
        f"{report['torch_threads']} torch threads",
        f"  CPU (one process, evaluations included): {cpu_s:.0f} s = "
        f"{cpu_s / (train_s + report['eval_seconds']):.2f} cores, {cpu_s / max(num_steps, 1):.1f} CPU s a step",
    ]
    return ArmResult("TRL GRPOTrainer", curve, num_steps, train_s, report["eval_seconds"], details), report["parity"]


def stop_by_pid(popen: subprocess.Popen, timeout_s: float = 30) -> None:
    if popen.poll() is None:
        os.kill(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(popen.pid, signal.SIGKILL)
            popen.wait()


# ---- the rollproof arm ----


def rollproof_curve(records: list[dict]) -> tuple[list[Evaluation], float]:
    """Evaluations on a clock without evaluation time, and the evaluation seconds. The first record's
    time is taken before its evaluation, every later one's after (trainer/main.py)."""
    evaluations = [r for r in records if "eval_reward" in r]
    if not evaluations:
        return [], 0.0
    start = evaluations[0]["time"] + evaluations[0]["eval_seconds"]
    curve, excluded = [Evaluation(0.0, evaluations[0]["step"], evaluations[0]["eval_reward"])], 0.0
    for record in evaluations[1:]:
        excluded += record["eval_seconds"]
        curve.append(Evaluation(record["time"] - start - excluded, record["step"], record["eval_reward"]))
    return curve, sum(r["eval_seconds"] for r in evaluations)


@dataclass(frozen=True)
class Window:
    """What the rollproof arm's processes did from its first evaluation to the end of its budget."""

    wall_s: float
    cpu_before: dict[str, dict[int, float]]
    cpu_after: dict[str, dict[int, float]]
    machine_busy_s: float
    num_node_tokens: int

    def cpu_seconds(self, prefix: str = "") -> float:
        return sum(
            seconds - self.cpu_before[name].get(tid, 0.0)
            for name, threads in self.cpu_after.items()
            if name.startswith(prefix)
            for tid, seconds in threads.items()
        )


def watch_rollproof(launcher: Launcher, args: argparse.Namespace) -> Window:
    """Wait for the first evaluation, then until the training clock passes the budget."""
    deadline = time.monotonic() + args.startup_timeout_s
    while not rollproof_curve(launcher.metrics())[0]:
        check_children(launcher)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no first evaluation within {args.startup_timeout_s} s; see {launcher.run_dir}/logs")
        time.sleep(0.5)
    pids = {child.name: child.popen.pid for child in launcher.children}
    cpu_before, machine_before = cpu_snapshot(pids), machine_busy_seconds()[0]
    tokens_before = sum(s["num_tokens_generated"] for s in launcher.node_statuses())
    started = time.monotonic()
    while rollproof_curve(launcher.metrics())[0][-1].seconds < args.budget_s:
        check_children(launcher)
        if time.monotonic() - started > 2 * args.budget_s + 60:
            break
        time.sleep(0.5)
    return Window(
        wall_s=time.monotonic() - started,
        cpu_before=cpu_before,
        cpu_after=cpu_snapshot(pids),
        machine_busy_s=machine_busy_seconds()[0] - machine_before,
        num_node_tokens=sum(s["num_tokens_generated"] for s in launcher.node_statuses()) - tokens_before,
    )


def check_children(launcher: Launcher) -> None:
    for child in launcher.children:
        if child.popen.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.popen.returncode}; see {child.log_path}")


def run_rollproof_arm(args: argparse.Namespace, run_dir: Path) -> ArmResult:
    launcher = Launcher(UpOptions(model=args.model, task=args.task, num_nodes=args.nodes, num_steps=0, run_dir=run_dir))
    try:
        launcher.start()
        window = watch_rollproof(launcher, args)
    finally:
        launcher.stop()
    records = launcher.metrics()
    curve, eval_s = rollproof_curve(records)
    steps = [r for r in records if "loss" in r]
    trained = [r for r in steps if not r.get("skipped")]
    num_groups = sum(r["num_groups"] for r in trained)
    staleness: dict[str, int] = {}
    for record in trained:
        for age, count in record["staleness"].items():
            staleness[age] = staleness.get(age, 0) + count
    wall_s, arm_cpu_s = window.wall_s, window.cpu_seconds()
    details = [
        f"  {len(steps)} steps in {curve[-1].seconds:.0f} s ({len(steps) / max(curve[-1].seconds, 1e-9):.2f} steps/s);"
        f" per step {mean(steps, 'wait_seconds'):.2f} s waiting for rollouts, {mean(steps, 'step_seconds'):.2f} s "
        f"training, {mean(steps, 'publish_seconds'):.2f} s publishing; {args.nodes} nodes "
        f"{window.num_node_tokens / wall_s:,.0f} tokens/s together, "
        f"{window.num_node_tokens / max(window.cpu_seconds('node'), 1e-9):,.0f} per node CPU s",
        f"  groups: {sum(r['num_groups_uninformative'] for r in trained) / max(num_groups, 1):.0%} uninformative; "
        f"staleness {dict(sorted(staleness.items()))}; masked tokens {mean(trained, 'masked_fraction'):.2%}",
        f"  CPU over {wall_s:.0f} s of wall time (evaluations included; the validator runs inside the coordinator): "
        f"{arm_cpu_s:.0f} s = {arm_cpu_s / wall_s:.2f} cores, {arm_cpu_s / max(len(steps), 1):.1f} CPU s a step; "
        f"the machine had {window.machine_busy_s / wall_s:.2f} of {os.cpu_count()} cores busy",
        *describe_cpu(window.cpu_before, window.cpu_after, wall_s),
    ]
    return ArmResult("rollproof up", curve, len(steps), curve[-1].seconds, eval_s, details)


def mean(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if key in r]
    return sum(values) / len(values) if values else 0.0


# ---- report ----


def describe_arm(arm: ArmResult, targets: tuple[float, ...], budget_s: float) -> list[str]:
    reached = ", ".join(f"{t}: {format_seconds(seconds_to(arm.curve, t))}" for t in targets)
    at_budget = reward_at(arm.curve, budget_s)
    return [
        f"{arm.name}: held-out {arm.curve[0].reward:.3f} -> best {max(e.reward for e in arm.curve):.3f}; "
        f"time to {reached}; reward at {budget_s:.0f} s {at_budget:.3f}; {len(arm.curve)} evaluations "
        f"({arm.eval_seconds:.0f} s, excluded)",
        *arm.details,
        "  curve (s, step, reward): " + " ".join(f"({e.seconds:.0f}, {e.step}, {e.reward:.3f})" for e in arm.curve),
    ]


def format_seconds(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds:.0f} s"


def ratio_line(target: float, ours: ArmResult, trl: ArmResult, budget_s: float, quick: bool) -> str:
    ours_s, trl_s = seconds_to(ours.curve, target), seconds_to(trl.curve, target)
    suffix = "; --quick" if quick else ""
    if ours_s is not None and trl_s is not None:
        value = f"{ours_s / max(trl_s, 1e-9):.2f}"
    elif trl_s is not None:
        value = f"> {budget_s / max(trl_s, 1e-9):.2f} (rollproof did not reach it in {budget_s:.0f} s)"
    elif ours_s is not None:
        value = f"< {ours_s / budget_s:.2f} (TRL did not reach it in {budget_s:.0f} s)"
    else:
        value = f"n/a (neither arm reached it in {budget_s:.0f} s)"
    return f"time-to-target-ratio-vs-trl@{target}: {value} (target: <= 1.0{suffix})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 s arms, targets start + 0.05 and + 0.1")
    parser.add_argument("--model", type=Path, help="model directory (default: the bootstrapped tiny model)")
    parser.add_argument("--task", default="addition")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--budget-s", type=float, help="training seconds per arm (default 600, quick 60)")
    parser.add_argument("--targets", type=float, nargs="+", help="held-out rewards (default 0.5 0.7)")
    parser.add_argument("--trl-threads", type=int, default=0, help="torch threads of the TRL arm (0: torch's default)")
    parser.add_argument("--startup-timeout-s", type=float, default=300)
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.budget_s = args.budget_s or (60.0 if args.quick else 600.0)
    if args.trl_worker:
        trl_worker(args)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the arms' `finally` stop their processes
    if args.model is None:
        from policy.bootstrap import bootstrapped_model_dir

        args.model = bootstrapped_model_dir(args.task)
    embedded = dict(setting.split("=", 1) for setting in EMBEDDED_TRAINER_SETTINGS)
    expected = {"optimizer.lr": LEARNING_RATE, "groups_per_step": PROMPTS_PER_STEP, "eval_problems": EVAL_PROBLEMS}
    if any(float(embedded[key]) != value for key, value in expected.items()):
        raise SystemExit(f"`rollproof up`'s trainer settings changed ({EMBEDDED_TRAINER_SETTINGS}): update the TRL arm")

    with tempfile.TemporaryDirectory(prefix="rollproof-bench-trl-") as scratch:
        trl_arm, parity = run_trl_arm(args, Path(scratch))
        report_trl_arm(args, trl_arm, parity)
        try:
            ours = run_rollproof_arm(args, Path(scratch) / "rollproof")
        except RuntimeError:
            for log in sorted((Path(scratch) / "rollproof").rglob("*.log")):
                print(f"--- {log.name}:", *log.read_text(errors="replace").splitlines()[-12:], sep="\n  ")
            raise
    print("\n".join(describe_arm(ours, args.targets, args.budget_s)))
    for target in args.targets:
        print(ratio_line(target, ours, trl_arm, args.budget_s, args.quick))
    for arm, name in ((ours, "rollproof"), (trl_arm, "trl")):
        print(f"reward-at-{args.budget_s:.0f}s-{name}: {reward_at(arm.curve, args.budget_s):.3f}")


def report_trl_arm(args: argparse.Namespace, trl_arm: ArmResult, parity: dict) -> None:
    """Print the set-up, the parity checks and the TRL arm, and fix the targets (--quick: from its start)."""
    start = trl_arm.curve[0].reward
    args.targets = tuple(
        args.targets or ((round(start + 0.05, 2), round(start + 0.1, 2)) if args.quick else (0.5, 0.7))
    )
    print(
        f"model {args.model}, task {args.task}, budget {args.budget_s:.0f} s of training an arm, "
        f"held-out = the first {EVAL_PROBLEMS} eval problems (seed {RUN_DEFAULTS.seed}), greedy"
    )
    print(
        f"identical: the first {parity['num_prompts']} prompts in lease order ({parity['num_prompt_batch_rows']} rows"
        f" of TRL's first batch), their token ids (TRL's tokenization = the coordinator's), and the rewards of "
        f"{parity['num_completions']} completions ({parity['num_reward_one']} of reward 1) decoded and scored by "
        "each arm's code"
    )
    print("cannot be equal:", *(f"  - {line}" for line in CANNOT_BE_EQUAL), sep="\n")
    print("\n".join(describe_arm(trl_arm, args.targets, args.budget_s)), flush=True)


if __name__ == "__main__":
    main()
