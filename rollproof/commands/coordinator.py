from __future__ import annotations

import argparse
from pathlib import Path

from rollproof.commands.config import add_config_arguments, load_role_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("coordinator", help="run the coordinator service")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve = actions.add_parser("serve", help="serve gRPC (nodes, trainer, operator) and HTTP (blobs, dashboard)")
    add_config_arguments(serve)
    serve.add_argument(
        "--data-dir", type=Path, help="store, blobs and endpoints.json (default ~/.rollproof/coordinator)"
    )
    serve.add_argument("--model", type=Path, help="model directory of the run (sets run.model)")
    serve.add_argument("--task", help="task name (sets run.task)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port, 0 for any free port")
    serve.add_argument("--http-port", type=int, help="HTTP port, 0 for any free port")
    serve.add_argument("--trainer-key-fingerprint", help="key id of the trainer key this run accepts")
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import asyncio

    from coordinator.server import serve

    config = load_role_config(
        "coordinator",
        args,
        {
            "data_dir": args.data_dir,
            "run.model": args.model,
            "run.task": args.task,
            "server.grpc_port": args.grpc_port,
            "server.http_port": args.http_port,
            "trainer_key_fingerprint": args.trainer_key_fingerprint,
        },
    )
    asyncio.run(serve(config))
    return 0
