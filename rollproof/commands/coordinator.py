from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from rollproof.commands.config import add_config_arguments, load_role_config

if TYPE_CHECKING:
    from coordinator.config import CoordinatorConfig

log = logging.getLogger(__name__)

# A replica that exits with an error status this soon after it started is not restarted: the others stop too.
MIN_REPLICA_UPTIME_S = 10.0
REPLICA_RESTART_DELAY_S = 1.0


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
    serve.add_argument(
        "--processes",
        type=int,
        default=1,
        help="coordinator processes (replicas) sharing the gRPC and HTTP ports and the store, which must be "
        "PostgreSQL (store.url); a replica that dies is restarted",
    )
    serve.add_argument("--replica", help=argparse.SUPPRESS)  # INDEX/COUNT, given by --processes to each replica
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import asyncio

    from coordinator.server import Replica, serve

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
    if args.processes < 1:
        raise ValueError(f"--processes is at least 1, got {args.processes}")
    if args.processes > 1:
        return _supervise_replicas(args, config)
    replica = None
    if args.replica is not None:
        index, count = (int(part) for part in args.replica.split("/"))
        replica = Replica(index, count)
    asyncio.run(serve(config, replica))
    return 0


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _replica_command(args: argparse.Namespace, grpc_port: int, http_port: int, index: int) -> list[str]:
    import sys

    command = [sys.executable, "-m", "rollproof.cli", "--log-level", args.log_level]
    if args.log_json:
        command.append("--log-json")
    command += ["coordinator", "serve"]
    if args.config is not None:
        command += ["--config", str(args.config)]
    for assignment in args.assignments:
        command += ["--set", assignment]
    for flag, value in (
        ("--data-dir", args.data_dir),
        ("--model", args.model),
        ("--task", args.task),
        ("--trainer-key-fingerprint", args.trainer_key_fingerprint),
    ):
        if value is not None:
            command += [flag, str(value)]
    return command + [
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--replica",
        f"{index}/{args.processes}",
    ]


def _supervise_replicas(args: argparse.Namespace, config: CoordinatorConfig) -> int:
    """Start args.processes replicas on the same ports (any free ones for 0), restart one that dies
    (killed, or failing after running a while), and stop them all (SIGTERM) on SIGTERM or SIGINT."""
    import signal
    import subprocess
    import threading
    import time

    from sqlalchemy.engine import make_url

    from coordinator.server import REPLICAS_NEED_POSTGRESQL

    if not config.store.url or make_url(config.store.url).get_backend_name() != "postgresql":
        raise ValueError(REPLICAS_NEED_POSTGRESQL)
    host = config.server.host
    grpc_port = config.server.grpc_port or _free_port(host)
    http_port = config.server.http_port or _free_port(host)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def start(index: int) -> tuple[subprocess.Popen, float]:
        return subprocess.Popen(_replica_command(args, grpc_port, http_port, index)), time.monotonic()

    replicas = [start(index) for index in range(args.processes)]
    log.info("%d coordinator replicas on gRPC %s:%d, HTTP %s:%d", args.processes, host, grpc_port, host, http_port)
    exit_code = 0
    while not stop.wait(0.5):
        for index, (process, started_s) in enumerate(replicas):
            code = process.poll()
            if code is None:
                continue
            # An error exit soon after start is a setup problem that a restart repeats; a replica killed
            # by a signal (its status negative) is started again however young.
            if code > 0 and time.monotonic() - started_s < MIN_REPLICA_UPTIME_S:
                log.error("replica %d exited with status %d at startup; stopping the others", index, code)
                exit_code = 1
                stop.set()
                break
            log.warning("replica %d (pid %d) exited with status %d; starting it again", index, process.pid, code)
            time.sleep(REPLICA_RESTART_DELAY_S)
            replicas[index] = start(index)
    for process, _ in replicas:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process, _ in replicas:
        process.wait()
    return exit_code
