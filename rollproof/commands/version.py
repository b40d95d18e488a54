from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("version", help="print the rollproof version and protocol version")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import platform

    from rollproof import __version__

    print(f"rollproof {__version__} (wire protocol rollproof.v1, Python {platform.python_version()})")
    return 0
