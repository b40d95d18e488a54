"""`rollproof validator run`: a validator process that takes full checks from a coordinator
(validation work leased to it), so validation scales out beyond the coordinator's process."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from rollproof.commands.admin import (
    DEFAULT_COORDINATOR,
    add_tls_arguments,
    coordinator_tls,
    operator_token,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("validator", help="run a validator process for a coordinator")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = actions.add_parser(
        "run", help="take sampled submissions from the coordinator, fully check them, report verdicts"
    )
    run.add_argument(
        "--coordinator",
        default=DEFAULT_COORDINATOR,
        help=f"coordinator gRPC address HOST:PORT (default {DEFAULT_COORDINATOR})",
    )
    run.add_argument("--token", help="operator token (default: $ROLLPROOF_OPERATOR_TOKEN)")
    add_tls_arguments(run)
    run.add_argument(
        "--model",
        type=Path,
        required=True,
        help="the run's model directory (its config and tokenizer; weights come from the coordinator)",
    )
    run.add_argument("--id", dest="validator_id", help="name shown in the coordinator's log (default HOST-PID)")
    run.add_argument("--max-groups", type=int, default=64, help="groups taken and replayed together (default 64)")
    run.add_argument("--device", default="cpu", help="where the replay runs: cpu, cuda or cuda:N (default cpu)")
    run.set_defaults(func=run_validator)


def run_validator(args: argparse.Namespace) -> int:
    import signal
    import threading

    from coordinator.validator_worker import ValidatorSettings, run_validator

    settings = ValidatorSettings(
        coordinator=args.coordinator,
        operator_token=operator_token(args),
        model_dir=args.model.expanduser(),
        validator_id=args.validator_id or f"{socket.gethostname()}-{os.getpid()}",
        max_groups=args.max_groups,
        device=args.device,
        tls=coordinator_tls(args),
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    run_validator(settings, stop)
    return 0
