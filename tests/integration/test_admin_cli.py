"""`rollproof admin` against a real coordinator process: every action works with the operator
token and is refused without it (issue 8)."""

import asyncio
import json
import os
import subprocess
import sys
import urllib.request

import grpc
import pytest

from node.client import CoordinatorClient
from protocol.identity import Identity
from protocol.proto import service_pb2, service_pb2_grpc
from tests.integration.cluster import OPERATOR_TOKEN, Cluster

NODE_NAME = "admin-test\x1b[31m-box"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    cluster = Cluster(tmp_path_factory.mktemp("admin"), tiny_model, Identity.generate())
    cluster.publish_fixed_policy()
    cluster.start_coordinator()
    yield cluster
    cluster.stop_all()


@pytest.fixture(scope="module")
def node_id(cluster) -> str:
    async def register() -> str:
        client = CoordinatorClient(cluster.address, Identity.generate(), tls=cluster.coordinator_tls)
        reply = await client.register(service_pb2.RegisterRequest(display_name=NODE_NAME, engine="torch"))
        await client.close()
        return reply.node_id

    return asyncio.run(register())


def admin(cluster: Cluster, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ROLLPROOF_OPERATOR_TOKEN"}
    if token is not None:
        env["ROLLPROOF_OPERATOR_TOKEN"] = token
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "rollproof.cli",
            "admin",
            *args,
            "--coordinator",
            cluster.address,
            "--coordinator-ca",
            str(cluster.certificate_pair.certificate_file),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def dashboard_state(cluster: Cluster, node_id: str) -> str:
    with urllib.request.urlopen(f"{cluster.http_address()}/api/v1/nodes/{node_id}", timeout=10) as response:
        return json.loads(response.read())["node"]["state"]


def test_admin_commands_are_refused_without_the_operator_token(cluster, node_id):
    missing = admin(cluster, "nodes")
    assert missing.returncode == 2 and "ROLLPROOF_OPERATOR_TOKEN" in missing.stderr
    for action in (["nodes"], ["status"], ["versions"], ["ban", node_id, "--reason", "x"], ["unban", node_id]):
        wrong = admin(cluster, *action, token="not-the-token")
        assert wrong.returncode == 2 and "UNAUTHENTICATED" in wrong.stderr, (action, wrong.stderr)
    assert dashboard_state(cluster, node_id) == "online"

    with cluster.channel() as channel:
        stub = service_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.BanNode(service_pb2.BanRequest(node_id=node_id, reason="no token"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_admin_commands_with_the_operator_token(cluster, node_id):
    nodes = admin(cluster, "nodes", token=OPERATOR_TOKEN)
    assert nodes.returncode == 0, nodes.stderr
    assert node_id in nodes.stdout and "online" in nodes.stdout
    assert "\x1b" not in nodes.stdout and "admin-test\\x1b[31m-box" in nodes.stdout

    banned = admin(cluster, "ban", node_id, "--reason", "testing bans", "--token", OPERATOR_TOKEN)
    assert banned.returncode == 0 and f"banned {node_id} (banned)" in banned.stdout, banned.stderr
    assert dashboard_state(cluster, node_id) == "banned"
    listed = json.loads(admin(cluster, "nodes", "--json", token=OPERATOR_TOKEN).stdout)
    assert [n["state"] for n in listed["nodes"] if n["node_id"] == node_id] == ["NODE_STATE_BANNED"]
    unbanned = admin(cluster, "unban", node_id, token=OPERATOR_TOKEN)
    assert unbanned.returncode == 0 and f"unbanned {node_id} (online)" in unbanned.stdout, unbanned.stderr
    assert dashboard_state(cluster, node_id) == "online"

    status = admin(cluster, "status", token=OPERATOR_TOKEN)
    assert status.returncode == 0, status.stderr
    assert "run                    demo" in status.stdout and "latest policy version  1" in status.stdout
    versions = admin(cluster, "versions", token=OPERATOR_TOKEN)
    assert versions.returncode == 0, versions.stderr
    assert versions.stdout.splitlines()[1].split()[:3] == ["1", "1", "keyframe"]

    unknown = admin(cluster, "ban", "no-such-node", "--reason", "x", token=OPERATOR_TOKEN)
    assert unknown.returncode == 2 and "not registered" in unknown.stderr
