from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("keygen", help="create an Ed25519 key file (mode 0600) and print its key id")
    parser.add_argument("--out", type=Path, required=True, help="path of the key file to write")
    parser.add_argument("--force", action="store_true", help="overwrite an existing key file")
    parser.add_argument("--show", action="store_true", help="print the key id of an existing key file instead")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from protocol.identity import Identity

    if args.show:
        identity = Identity.load(args.out)
    else:
        identity = Identity.generate()
        identity.save(args.out, overwrite=args.force)
        print(f"wrote {args.out}")
    print(f"key id: {identity.key_id}")
    return 0
