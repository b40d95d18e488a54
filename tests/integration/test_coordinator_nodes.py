"""Coordinator + 2 nodes as real processes on loopback, with crashes (issue 5)."""

import json

from protocol.identity import Identity
from tests.integration.cluster import Cluster, wait_for

COORDINATOR_FLAGS = [
    "--set",
    "lease.deadline_s=8",
    "--set",
    "run.prompts_per_lease=2",
    "--set",
    "run.group_size=4",
    "--set",
    "run.sampling.max_tokens=12",
    "--set",
    "heartbeat_interval_s=1",
    "--set",
    "run.max_backlog_groups=0",  # no trainer consumes here: never throttle the nodes
]


MAX_SPOOL_TRIES = 5
SPOOL_WAIT_S = 20


def node_status(cluster: Cluster, name: str) -> dict:
    path = cluster.root / name / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def accepted_total(cluster: Cluster) -> int:
    return cluster.query("SELECT COALESCE(SUM(num_rollouts_accepted), 0) FROM nodes")[0][0]


def test_nodes_survive_crashes_of_a_node_and_of_the_coordinator(tmp_path, tiny_model):
    cluster = Cluster(tmp_path, tiny_model, Identity.generate())
    try:
        cluster.publish_fixed_policy()
        coordinator = cluster.start_coordinator(*COORDINATOR_FLAGS)
        cluster.start_node("node-1", "--batch-size", "8")
        cluster.start_node("node-2", "--batch-size", "8")
        wait_for(lambda: accepted_total(cluster) >= 100, 240, "100 accepted rollouts")

        node_1_id = wait_for(lambda: node_status(cluster, "node-1").get("node_id"), 60, "node-1 to write its status")
        open_lease = wait_for(
            lambda: cluster.query(
                "SELECT lease_id, lease_number FROM leases WHERE node_id = ? AND state = 'open'", node_1_id
            ),
            60,
            "node-1 to hold a lease",
            interval_s=0.05,
        )[0]
        cluster.processes[1].kill9()
        lease_id, lease_number = open_lease
        wait_for(
            lambda: cluster.query("SELECT state FROM leases WHERE lease_id = ?", lease_id)[0][0] != "open",
            60,
            "the dead node's lease to expire",
        )
        assert cluster.query("SELECT state FROM leases WHERE lease_id = ?", lease_id)[0][0] in ("expired", "submitted")
        if cluster.query("SELECT state FROM leases WHERE lease_id = ?", lease_id)[0][0] == "expired":
            reassigned = wait_for(
                lambda: cluster.query(
                    "SELECT node_id FROM leases WHERE lease_number = ? AND lease_id != ?",
                    lease_number,
                    lease_id,
                ),
                60,
                "the expired lease's prompts to be leased again",
            )
            assert reassigned[0][0] != node_1_id

        # A node spools only a batch it generated while the coordinator was down; one caught
        # between batches (in a lease call) has none: then restart and kill again.
        for _ in range(MAX_SPOOL_TRIES):
            before_crash = accepted_total(cluster)
            coordinator.kill9()
            try:
                wait_for(
                    lambda: node_status(cluster, "node-2").get("num_batches_spooled", 0) >= 1,
                    SPOOL_WAIT_S,
                    "node-2 to spool a batch",
                )
                break
            except AssertionError:
                coordinator = cluster.start_coordinator(*COORDINATOR_FLAGS)
                wait_for(lambda before=before_crash: accepted_total(cluster) > before, 120, "work after the restart")
        else:
            raise AssertionError(f"node-2 held no batch at any of {MAX_SPOOL_TRIES} kills of the coordinator")
        cluster.start_coordinator(*COORDINATOR_FLAGS)
        wait_for(
            lambda: (
                node_status(cluster, "node-2").get("num_batches_spooled", 1) == 0
                and accepted_total(cluster) > before_crash
            ),
            120,
            "node-2 to re-send its spool",
        )
        assert accepted_total(cluster) >= before_crash

        cluster.processes[2].terminate()
        status = node_status(cluster, "node-2")
        stored = cluster.query(
            "SELECT num_rollouts_accepted + num_rollouts_rejected FROM nodes WHERE node_id = ?", status["node_id"]
        )[0][0]
        assert stored == status["num_rollouts_accepted"] + status["num_rollouts_rejected"], (
            "a batch counted twice or lost"
        )
        assert cluster.query("SELECT COUNT(*) FROM submissions GROUP BY batch_hash HAVING COUNT(*) > 1") == []
        # the node's standing, as the coordinator told it
        assert status["dashboard_url"].endswith(f"/nodes/{status['node_id']}") and status["num_nodes"] >= 1
    finally:
        cluster.stop_all()


def test_a_node_in_a_precision_the_run_refuses_stops_with_the_reason(tmp_path, tiny_model):
    cluster = Cluster(tmp_path, tiny_model, Identity.generate())
    try:
        cluster.publish_fixed_policy()
        cluster.start_coordinator("--set", 'validation.precisions=["float32"]')
        node = cluster.start_node("bf16-node", "--set", "engine.dtype=bfloat16")
        wait_for(lambda: node.popen.poll() is not None, 120, "the bf16 node to stop")
        assert node.popen.returncode != 0
        assert "this run accepts nodes computing in float32 only" in node.log()
        assert cluster.query("SELECT COUNT(*) FROM nodes")[0][0] == 0
    finally:
        cluster.stop_all()
