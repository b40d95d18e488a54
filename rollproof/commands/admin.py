"""`rollproof admin`: the operator's commands, sent to the coordinator's AdminService with the
operator token (--token or ROLLPROOF_OPERATOR_TOKEN)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protocol.tls import CoordinatorTls

TOKEN_ENVIRONMENT_VARIABLE = "ROLLPROOF_OPERATOR_TOKEN"
CA_ENVIRONMENT_VARIABLE = "ROLLPROOF_OPERATOR_COORDINATOR_CA"
FINGERPRINT_ENVIRONMENT_VARIABLE = "ROLLPROOF_OPERATOR_COORDINATOR_FINGERPRINT"
DEFAULT_COORDINATOR = "127.0.0.1:7470"
TIMEOUT_S = 30.0
NUM_ATTEMPTS = 4  # an operator at a terminal waits seconds for a coordinator that is restarting, not forever


class OperatorTokenMissingError(ValueError):
    """No operator token was given."""


class AdminRequestError(ValueError):
    """The coordinator refused or could not answer an admin request."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("admin", help="operate a run: list, ban and unban nodes, show status and versions")
    # the connection flags go before the action or after it
    add_connection_arguments(parser)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    nodes = actions.add_parser("nodes", help="list the registered nodes")
    add_connection_arguments(nodes, defaults=argparse.SUPPRESS)
    nodes.set_defaults(func=run_nodes)
    ban = actions.add_parser("ban", help="ban a node: its requests are refused and its groups are not trained on")
    add_connection_arguments(ban, defaults=argparse.SUPPRESS)
    ban.add_argument("node_id", metavar="NODE_ID")
    ban.add_argument("--reason", required=True, help="shown to the node and on the dashboard")
    ban.set_defaults(func=run_ban)
    unban = actions.add_parser("unban", help="lift a node's ban")
    add_connection_arguments(unban, defaults=argparse.SUPPRESS)
    unban.add_argument("node_id", metavar="NODE_ID")
    unban.set_defaults(func=run_unban)
    status = actions.add_parser("status", help="show the run's counters")
    add_connection_arguments(status, defaults=argparse.SUPPRESS)
    status.set_defaults(func=run_status)
    versions = actions.add_parser("versions", help="list the published policy versions")
    add_connection_arguments(versions, defaults=argparse.SUPPRESS)
    versions.set_defaults(func=run_versions)


def add_connection_arguments(parser: argparse.ArgumentParser, defaults: Any = None) -> None:
    """The connection flags; `defaults=argparse.SUPPRESS` on an action's parser keeps the values
    given before the action."""
    parser.add_argument(
        "--coordinator",
        default=DEFAULT_COORDINATOR if defaults is None else defaults,
        help=f"coordinator gRPC address HOST:PORT (default {DEFAULT_COORDINATOR})",
    )
    parser.add_argument("--token", default=defaults, help=f"operator token (default: ${TOKEN_ENVIRONMENT_VARIABLE})")
    add_tls_arguments(parser, defaults)
    parser.add_argument(
        "--json", action="store_true", default=False if defaults is None else defaults, help="print JSON"
    )


def add_tls_arguments(parser: argparse.ArgumentParser, defaults: Any = None) -> None:
    parser.add_argument(
        "--coordinator-ca",
        type=Path,
        default=defaults,
        help="PEM file of the CA (or self-signed certificate) of the coordinator's TLS "
        f"(default: ${CA_ENVIRONMENT_VARIABLE})",
    )
    parser.add_argument(
        "--coordinator-fingerprint",
        default=defaults,
        help="pinned SHA-256 fingerprint of the coordinator's TLS certificate "
        f"(default: ${FINGERPRINT_ENVIRONMENT_VARIABLE})",
    )


def coordinator_tls(args: argparse.Namespace) -> CoordinatorTls:
    """The flags when either is given, else the environment; neither: plaintext, loopback only."""
    from protocol.tls import CoordinatorTls

    if args.coordinator_ca is None and not args.coordinator_fingerprint:
        ca_file = os.environ.get(CA_ENVIRONMENT_VARIABLE, "")
        return CoordinatorTls(Path(ca_file) if ca_file else None, os.environ.get(FINGERPRINT_ENVIRONMENT_VARIABLE, ""))
    return CoordinatorTls(args.coordinator_ca, args.coordinator_fingerprint or "")


def operator_token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get(TOKEN_ENVIRONMENT_VARIABLE, "")
    if not token:
        raise OperatorTokenMissingError(
            f"admin commands need the operator token: pass --token or set {TOKEN_ENVIRONMENT_VARIABLE} "
            "(the coordinator's operator_token setting)"
        )
    return token


def printable(text: str) -> str:
    """Node-supplied text with control characters (terminal escape sequences) made visible."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def call(args: argparse.Namespace, method: str, request: Any) -> Any:
    """Call AdminService.method with the operator token; coordinator errors become AdminRequestError."""
    import grpc

    from protocol.channel import open_channel
    from protocol.proto import service_pb2_grpc
    from protocol.retry import RetryPolicy, call_with_retry

    token = operator_token(args)
    with open_channel(args.coordinator, coordinator_tls(args)) as channel:
        stub = service_pb2_grpc.AdminServiceStub(channel)
        try:
            return call_with_retry(
                lambda: getattr(stub, method)(
                    request, metadata=(("authorization", f"Bearer {token}"),), timeout=TIMEOUT_S
                ),
                address=args.coordinator,
                what=method,
                policy=RetryPolicy(max_backoff_s=4.0, max_attempts=NUM_ATTEMPTS),
            )
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise AdminRequestError(f"no coordinator answers at {args.coordinator}: {error.details()}") from None
            raise AdminRequestError(f"the coordinator refused {method} ({code.name}): {error.details()}") from None


def format_time(ms: int) -> str:
    if ms <= 0:
        return "never"
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(headers)] + [[printable(str(cell)) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def print_json(message: Any) -> None:
    from google.protobuf.json_format import MessageToDict

    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))


def node_state_name(state: int) -> str:
    from protocol.proto import service_pb2

    return service_pb2.NodeState.Name(state).removeprefix("NODE_STATE_").lower()


def node_rows(nodes: Sequence[Any]) -> list[list[Any]]:
    now_ms = time.time_ns() // 1_000_000
    return [
        [
            node.node_id,
            node.display_name,
            node_state_name(node.state),
            node.engine,
            node.num_accepted,
            node.num_rejected,
            f"{node.reputation:.2f}",
            node.policy_version,
            f"{max(0, now_ms - node.last_seen_ms) // 1000} s ago" if node.last_seen_ms > 0 else "never",
        ]
        for node in nodes
    ]


NODE_HEADERS = ("NODE_ID", "NAME", "STATE", "ENGINE", "ACCEPTED", "REJECTED", "REPUTATION", "VERSION", "LAST_SEEN")


def show(args: argparse.Namespace, message: Any, print_text: Callable[[Any], None]) -> int:
    if args.json:
        print_json(message)
    else:
        print_text(message)
    return 0


def run_nodes(args: argparse.Namespace) -> int:
    from protocol.proto import service_pb2

    reply = call(args, "ListNodes", service_pb2.ListNodesRequest())
    return show(args, reply, lambda r: print_table(NODE_HEADERS, node_rows(r.nodes)))


def run_ban(args: argparse.Namespace) -> int:
    from protocol.proto import service_pb2

    reply = call(args, "BanNode", service_pb2.BanRequest(node_id=args.node_id, reason=args.reason))
    return show(args, reply, lambda r: print(f"banned {r.node.node_id} ({node_state_name(r.node.state)})"))


def run_unban(args: argparse.Namespace) -> int:
    from protocol.proto import service_pb2

    reply = call(args, "UnbanNode", service_pb2.UnbanRequest(node_id=args.node_id))
    return show(args, reply, lambda r: print(f"unbanned {r.node.node_id} ({node_state_name(r.node.state)})"))


def print_status(status: Any) -> None:
    info = status.run_info
    lines = [
        ("run", info.run_id),
        ("task", info.task),
        ("model", info.model_name),
        ("trainer key", info.trainer_key_fingerprint),
        ("trainer step", status.trainer_step),
        ("latest policy version", info.latest_policy_version),
        ("nodes online", status.num_nodes_online),
        ("rollouts accepted", status.num_rollouts_accepted),
        ("rollouts rejected", status.num_rollouts_rejected),
        ("groups ready", status.num_groups_ready),
        ("groups consumed", status.num_groups_consumed),
        ("groups stale", status.num_groups_stale),
    ]
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"{label.ljust(width)}  {printable(str(value))}")


def run_status(args: argparse.Namespace) -> int:
    from protocol.proto import service_pb2

    return show(args, call(args, "GetRunStatus", service_pb2.RunStatusRequest()), print_status)


def run_versions(args: argparse.Namespace) -> int:
    from protocol.proto import policy_pb2, service_pb2

    reply = call(args, "ListVersions", service_pb2.ListVersionsRequest())

    def print_versions(versions: Any) -> None:
        rows = [
            [
                v.version,
                v.base_version,
                policy_pb2.Codec.Name(v.codec).removeprefix("CODEC_").lower(),
                v.num_bytes,
                f"{v.num_bytes / v.full_state_bytes:.2%}" if v.full_state_bytes else "-",
                format_time(v.created_at_ms),
                v.num_nodes_holding,
            ]
            for v in versions.versions
        ]
        print_table(("VERSION", "BASE", "KIND", "BYTES", "OF_FULL", "PUBLISHED_UTC", "HOLDERS"), rows)

    return show(args, reply, print_versions)
