from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "up", help="run coordinator, validator, trainer and nodes on this machine, with a live view"
    )
    parser.add_argument("--nodes", type=int, default=2, help="number of worker nodes (default 2)")
    parser.add_argument("--model", type=Path, help="model directory (default: the bootstrapped tiny model)")
    parser.add_argument("--task", default="addition", help="task name (default: addition)")
    parser.add_argument("--steps", type=int, default=0, help="trainer steps, then stop (default: until Ctrl-C)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("~/.rollproof/up"),
        help="each run gets a directory under DATA_DIR/runs/ (default ~/.rollproof/up)",
    )
    parser.add_argument(
        "--coordinator-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a coordinator config key; repeatable",
    )
    parser.add_argument(
        "--trainer-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a trainer config key; repeatable",
    )
    parser.add_argument(
        "--node-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key of every node, e.g. engine.kind=vllm; repeatable",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import signal
    import sys
    import time

    from rollproof.launcher import Launcher, UpOptions, as_set_flags
    from rollproof.progress import ChildExitedError, watch

    if args.nodes < 1:
        raise ValueError("--nodes must be at least 1")
    data_dir = args.data_dir.expanduser()
    model = args.model.expanduser() if args.model else _bootstrapped_model(args.task)
    run_dir = data_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")
    options = UpOptions(
        model=model,
        task=args.task,
        num_nodes=args.nodes,
        num_steps=args.steps,
        run_dir=run_dir,
        extra_coordinator=as_set_flags(args.coordinator_set),
        extra_trainer=as_set_flags(args.trainer_set),
        extra_node=as_set_flags(args.node_set),
    )
    launcher = Launcher(options)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the children like Ctrl-C
    failure = None
    try:
        launcher.start()
        watch(launcher)
    except KeyboardInterrupt:
        pass
    except ChildExitedError as error:
        failure = str(error)
    finally:
        print("stopping every child process ...", flush=True)
        launcher.stop()
    curve = launcher.eval_curve()
    if curve:
        print("held-out reward of the published policy:")
        for step, seconds, reward in curve:
            print(f"  step {step:4d}  {seconds:7.0f}s  {reward:.3f}")
    print(f"logs, checkpoints and metrics: {run_dir}")
    if failure:
        print(f"rollproof up: error: {failure}", file=sys.stderr)
        return 1
    return 0


def _bootstrapped_model(task: str) -> Path:
    """The default tiny model warmed up on `task`, made on the first run and cached."""
    from policy.bootstrap import BootstrapSettings, ensure_bootstrapped

    print(f"bootstrapping the default model on {task} (cached after the first run) ...", flush=True)
    result = ensure_bootstrapped(BootstrapSettings(task=task))
    report = result.report
    print(f"model {result.directory}: held-out reward {report['eval_reward_after']:.3f} after the warm-up", flush=True)
    return result.directory
