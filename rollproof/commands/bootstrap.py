from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bootstrap",
        help="make the default tiny model: a short supervised warm-up on a task, cached",
        description=(
            "Create the tiny character-level model and warm it up on a task's reference answers. "
            "The result is cached by its settings; a second call prints the cached directory at once."
        ),
    )
    parser.add_argument("--task", help="task name (default: the default task, addition)")
    parser.add_argument("--steps", type=int, help="most training steps (default 1500)")
    parser.add_argument(
        "--stop-at-reward",
        type=float,
        help="stop once the greedy reward on unseen train-split problems reaches this (default 0.25); "
        "0 trains all --steps",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data (default: 0)")
    parser.add_argument("--out", type=Path, help="write the model here instead of the cache")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="cache root; the model goes to DATA_DIR/models/<task>-<hash> (default: ~/.cache/rollproof "
        "or $ROLLPROOF_CACHE_DIR)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from policy.bootstrap import BootstrapSettings, ensure_bootstrapped

    overrides = {key: value for key, value in (("task", args.task), ("num_steps", args.steps)) if value is not None}
    if args.stop_at_reward is not None:
        overrides["stop_at_reward"] = args.stop_at_reward or None  # 0: train every step
    settings = BootstrapSettings(seed=args.seed, **overrides)
    result = ensure_bootstrapped(settings, out_dir=args.out, cache_root=args.data_dir)
    report = result.report
    state = "cached" if result.cached else "made"
    print(
        f"{state}: held-out greedy reward {report['eval_reward_before']:.3f} before, "
        f"{report['eval_reward_after']:.3f} after warm-up "
        f"({report['model']['num_parameters']} parameters, trained {report['train_seconds']} s)"
    )
    print(result.directory)
    return 0
