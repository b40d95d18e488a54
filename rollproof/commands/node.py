from __future__ import annotations

import argparse
from pathlib import Path

from rollproof.commands.config import add_config_arguments, load_role_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("node", help="run or inspect a worker node")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="run the worker daemon against a coordinator")
    add_config_arguments(run)
    run.add_argument("--coordinator", help="coordinator gRPC address HOST:PORT")
    run.add_argument(
        "--coordinator-ca", type=Path, help="PEM file of the CA (or self-signed certificate) of the coordinator's TLS"
    )
    run.add_argument(
        "--coordinator-fingerprint", help="SHA-256 fingerprint of the coordinator's TLS certificate (pinned)"
    )
    run.add_argument(
        "--model", type=Path, required=True, help="model directory (config and tokenizer of the run's model)"
    )
    run.add_argument("--state-dir", type=Path, help="key, spool and status (default ~/.rollproof/node)")
    run.add_argument(
        "--key-file",
        type=Path,
        help="the node's key (must exist; default <state-dir>/node.key, created on first start)",
    )
    run.add_argument("--trainer-key-fingerprint", help="key id of the trainer key to trust")
    run.add_argument(
        "--accept-trainer-key", action="store_true", help="pin the coordinator's trainer key on first contact"
    )
    run.add_argument("--threads", type=int, help="torch threads (sets engine.threads)")
    run.add_argument("--batch-size", type=int, help="generation batch size (sets engine.batch_size)")
    run.add_argument("--name", help="display name on the dashboard")
    run.set_defaults(func=run_node)
    status = actions.add_parser("status", help="show the status of the node using a state directory")
    status.add_argument("--state-dir", type=Path, default=Path("~/.rollproof/node"))
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=show_status)


def run_node(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from node.daemon import NodeDaemon

    config = load_role_config(
        "node",
        args,
        {
            "coordinator": args.coordinator,
            "coordinator_ca": args.coordinator_ca,
            "coordinator_fingerprint": args.coordinator_fingerprint,
            "state_dir": args.state_dir,
            "key_file": args.key_file,
            "trainer_key_fingerprint": args.trainer_key_fingerprint,
            "engine.threads": args.threads,
            "engine.batch_size": args.batch_size,
            "display_name": args.name,
        },
    )
    daemon = NodeDaemon(config, model_dir=args.model, accept_trainer_key=args.accept_trainer_key)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, daemon.stop_event.set)
        await daemon.run()

    asyncio.run(main())
    return 0


def show_status(args: argparse.Namespace) -> int:
    import json
    import time
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from node.daemon import read_status

    status = read_status(args.state_dir)
    if args.json:
        print(json.dumps(asdict(status), indent=2))
        return 0
    table = Table(title=f"node {status.node_id}", show_header=False)
    age_s = (time.time_ns() // 1_000_000 - status.updated_ms) / 1000
    settles = (
        f" (the oldest settles from {time.strftime('%H:%M:%S', time.localtime(status.pending_settles_ms / 1000))},"
        " once its group is past its checks)"
        if status.pending_settles_ms
        else ""
    )
    last_rejection = "-"
    if status.last_rejection:
        last_rejection = f"{status.last_rejection_reason or 'rejected'}: {status.last_rejection}"
        if status.last_rejection_remedy:
            last_rejection += f"\nwhat to do: {status.last_rejection_remedy}"
    standing = f"rank {status.rank or '-'} of {status.num_nodes}, reputation {status.reputation:.2f}, "
    standing += f"{status.num_strikes} strikes"
    if status.on_probation:
        standing += "; on probation: its groups are held until its next node-level verdict"
    rows = [
        ("coordinator", f"{status.coordinator} ({status.link}, updated {age_s:.0f}s ago)"),
        ("policy version", str(status.policy_version)),
        ("tokens/s", f"{status.tokens_per_second:.1f}"),
        ("tokens generated", str(status.num_tokens_generated)),
        ("rollouts accepted / rejected", f"{status.num_rollouts_accepted} / {status.num_rollouts_rejected}"),
        ("batches spooled", str(status.num_batches_spooled)),
        ("standing", standing),
        ("banned", status.ban_reason or "no"),
        (
            "credit (tokens)",
            f"{status.settled_tokens} settled, {status.pending_tokens} pending{settles}, {status.voided_tokens} voided",
        ),
        ("last rejection", last_rejection),
        ("dashboard", status.dashboard_url or "-"),
        ("waiting for", status.waiting_for or "-"),
        ("last error", status.last_error or "-"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
    return 0
