from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="mean reward of a model on a task's held-out split (greedy)")
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model directory")
    parser.add_argument("--task", default="addition", help="task name (default: addition)")
    parser.add_argument("--num-problems", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="run seed of the task's eval split")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from envs import get_task
    from policy.evaluate import evaluate
    from policy.model import load_model
    from policy.tokenizer import load_tokenizer

    task = get_task(args.task)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    result = evaluate(
        model,
        load_tokenizer(args.model.expanduser()),
        task,
        num_problems=args.num_problems,
        seed=args.seed,
        max_tokens=args.max_tokens,
    )
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(
            f"{result.task}: mean reward {result.mean_reward:.3f} over {result.num_problems} held-out problems "
            f"({result.num_exact} fully correct)"
        )
    return 0
