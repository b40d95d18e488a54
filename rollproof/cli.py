"""Entry point of the `rollproof` command. Heavy imports happen inside the handlers."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rollproof.commands import COMMAND_MODULES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rollproof",
        description="Reinforcement learning for language models on untrusted peer-to-peer compute.",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-json", action="store_true", help="log JSON lines instead of readable text")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # gRPC's core logs its own copy of errors we report in one line (GRPC_VERBOSITY=debug brings it back)
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from rollproof.logs import setup_logging

    setup_logging(args.log_level, json_lines=args.log_json, process_name=args.command)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (`rollproof admin versions | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ValueError as error:
        # User errors (bad config, bad key file, bad input) are ValueErrors with an actionable message.
        print(f"rollproof {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
