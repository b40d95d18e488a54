"""The pass-rate buffer in a real coordinator with a real node: once a prompt's group came back all
failed (the untrained tiny model solves no addition), new leases leave it out."""

import json

from coordinator.scheduler import prompt_indices_for_lease
from protocol.identity import Identity
from tests.integration.cluster import Cluster, wait_for

NUM_PROMPTS, PROMPTS_PER_LEASE = 8, 4


def test_prompts_last_seen_all_failed_leave_new_leases(tmp_path, tiny_model):
    cluster = Cluster(tmp_path, tiny_model, Identity.generate())
    try:
        cluster.publish_fixed_policy()
        cluster.start_coordinator(
            *("--set", f"run.num_prompts={NUM_PROMPTS}", "--set", f"run.prompts_per_lease={PROMPTS_PER_LEASE}"),
            *("--set", "run.keep_solved_or_failed=0", "--set", "run.group_size=4"),
            *("--set", "run.sampling.max_tokens=8", "--set", "run.max_backlog_groups=0"),
        )
        cluster.start_node("node-1", "--batch-size", "8")

        def eight_leases():
            rows = cluster.query("SELECT lease_number, prompt_indices FROM leases ORDER BY lease_number")
            return rows if len(rows) >= 8 else None

        leases = wait_for(eight_leases, 240, "8 leases")
        for lease_number, prompt_indices in leases:
            full = prompt_indices_for_lease(0, lease_number, PROMPTS_PER_LEASE, NUM_PROMPTS)
            assert tuple(json.loads(prompt_indices)) in (full, full[:1]), lease_number
        assert len(json.loads(leases[0][1])) == PROMPTS_PER_LEASE, "nothing was seen before the first lease"
        assert [len(json.loads(p)) for _, p in leases[-2:]] == [1, 1], "every prompt came back all failed"
    finally:
        cluster.stop_all()
