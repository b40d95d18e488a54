"""A node on the vLLM engine against a real coordinator: its rollouts pass the full check (issue 10).
Skipped without vLLM."""

import pytest

pytest.importorskip("vllm")

from policy.bootstrap import bootstrapped_model_dir  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from tests.integration.cluster import Cluster, wait_for  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

NUM_CHECKED_GROUPS = 12


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vllm_node_rollouts_pass_the_validators_full_check(tmp_path, dtype):
    cluster = Cluster(tmp_path, bootstrapped_model_dir(), Identity.generate())
    try:
        cluster.publish_fixed_policy()
        cluster.start_coordinator(
            "--set",
            "run.prompts_per_lease=4",
            "--set",
            "run.group_size=4",
            "--set",
            "run.max_backlog_groups=0",
            "--set",
            f"validation.num_initial_checks={NUM_CHECKED_GROUPS}",
        )
        node = cluster.start_node(
            "vllm-node", "--set", "engine.kind=vllm", "--set", f"engine.dtype={dtype}", "--batch-size", "16"
        )
        wait_for(
            lambda: (
                node.popen.poll() is not None
                or cluster.query("SELECT COUNT(*) FROM validation_results")[0][0] >= NUM_CHECKED_GROUPS
            ),
            300,
            f"{NUM_CHECKED_GROUPS} full checks of the vLLM node's groups",
        )
        assert node.popen.poll() is None, node.log()
        assert cluster.query("SELECT check_name FROM validation_results WHERE NOT passed") == []
        ((engine, accepted, rejected),) = cluster.query(
            "SELECT engine, num_rollouts_accepted, num_rollouts_rejected FROM nodes"
        )
        assert engine == f"vllm-cpu-{dtype}"
        assert accepted >= NUM_CHECKED_GROUPS * 4 and rejected == 0
    finally:
        cluster.stop_all()
