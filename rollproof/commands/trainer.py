from __future__ import annotations

import argparse
from pathlib import Path

from rollproof.commands.config import add_config_arguments, load_role_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("trainer", help="run the RL trainer")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="train on accepted groups and publish signed policy versions")
    add_config_arguments(run)
    run.add_argument("--coordinator", help="coordinator gRPC address HOST:PORT")
    run.add_argument("--model", type=Path, help="initial model directory")
    run.add_argument("--data-dir", type=Path, help="key, checkpoints, metrics (default ~/.rollproof/trainer)")
    run.add_argument("--max-steps", type=int, help="stop after this many steps (0: run until stopped)")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the data dir")
    run.set_defaults(func=run_trainer)


def run_trainer(args: argparse.Namespace) -> int:
    import signal

    from trainer.main import Trainer

    config = load_role_config(
        "trainer",
        args,
        {"coordinator": args.coordinator, "model": args.model, "data_dir": args.data_dir, "max_steps": args.max_steps},
    )
    trainer = Trainer(config, resume=args.resume)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: trainer.stop_event.set())
    print(f"trainer key id: {trainer.identity.key_id}", flush=True)
    trainer.run()
    return 0
