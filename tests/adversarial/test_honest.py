"""Honest nodes are never penalised (issue 7): real `rollproof node run` processes at several
batch sizes, thread counts and precisions, every submission fully checked."""

import pytest

from tests.integration.cluster import wait_for

CONFIGS = {
    "fp32-bs1-t1": ["--batch-size", "1", "--threads", "1"],
    "fp32-bs8-t2": ["--batch-size", "8", "--threads", "2"],
    "fp32-bs32-t1": ["--batch-size", "32", "--threads", "1"],
    "bf16-bs1-t2": ["--batch-size", "1", "--threads", "2", "--set", "engine.dtype=bfloat16"],
    "bf16-bs8-t1": ["--batch-size", "8", "--threads", "1", "--set", "engine.dtype=bfloat16"],
    "bf16-bs32-t2": ["--batch-size", "32", "--threads", "2", "--set", "engine.dtype=bfloat16"],
}


def _validated_rollouts(cluster, node_ids) -> int:
    marks = ",".join("?" * len(node_ids))
    return cluster.query(
        f"SELECT COALESCE(SUM(g.num_rollouts), 0) FROM validation_results v JOIN groups g ON g.group_id = v.group_id "
        f"WHERE v.node_id IN ({marks})",
        *node_ids,
    )[0][0]


def _run_honest_nodes(cluster, names: list[str], num_rollouts: int, timeout_s: float):
    nodes = [cluster.start_node(f"honest-{name}", *CONFIGS[name]) for name in names]
    try:
        node_ids = wait_for(
            lambda: (
                [row[0] for row in cluster.query("SELECT node_id FROM nodes WHERE display_name LIKE 'honest-%'")]
                if len(cluster.query("SELECT node_id FROM nodes WHERE display_name LIKE 'honest-%'")) >= len(names)
                else None
            ),
            120,
            "the honest nodes to register",
        )
        wait_for(
            lambda: _validated_rollouts(cluster, node_ids) >= num_rollouts,
            timeout_s,
            f"{num_rollouts} checked rollouts",
        )
    finally:
        for node in nodes:
            node.terminate()
    marks = ",".join("?" * len(node_ids))
    failed = cluster.query(
        f"SELECT check_name, evidence_json FROM validation_results WHERE passed = 0 AND node_id IN ({marks})", *node_ids
    )
    rejected = cluster.query(
        f"SELECT reason, message FROM verdicts WHERE accepted = 0 AND node_id IN ({marks})", *node_ids
    )
    banned = cluster.query(f"SELECT node_id FROM nodes WHERE banned = 1 AND node_id IN ({marks})", *node_ids)
    assert failed == [] and rejected == [] and banned == [], (failed[:3], rejected[:3], banned)
    return _validated_rollouts(cluster, node_ids)


def test_honest_nodes_are_never_rejected(cluster):
    checked = _run_honest_nodes(cluster, ["fp32-bs8-t2", "bf16-bs32-t2"], 96, 300)
    assert checked >= 96


@pytest.mark.slow
def test_honest_nodes_at_every_setting_over_a_thousand_rollouts(cluster):
    checked = _run_honest_nodes(cluster, list(CONFIGS), 1000, 1200)
    assert checked >= 1000
