"""`rollproof certs`: a self-signed TLS certificate and key for the coordinator's gRPC side of a
small deployment. Clients trust it by the certificate file (coordinator_ca) or its fingerprint."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "certs", help="make a self-signed TLS certificate and key for the coordinator and print its fingerprint"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for coordinator.crt and coordinator.key")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name or IP address clients dial the coordinator by (repeatable; loopback is always included)",
    )
    parser.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    parser.add_argument("--force", action="store_true", help="replace an existing pair")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from protocol.tls import make_self_signed_pair

    pair = make_self_signed_pair(args.out, args.host, days=args.days, overwrite=args.force)
    print(f"wrote {pair.certificate_file} and {pair.key_file}")
    print(f"coordinator:  --set server.tls_cert={pair.certificate_file} --set server.tls_key={pair.key_file}")
    print(f"clients:      --coordinator-ca {pair.certificate_file}   (or pin the fingerprint below)")
    print(f"fingerprint (SHA-256): {pair.fingerprint}")
    return 0
