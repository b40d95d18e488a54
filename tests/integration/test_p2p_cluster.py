"""The peer network wired into the real processes (issue 9): a coordinator with its seed peer and
nodes with p2p on follow the policy through each other, announcements included."""

from protocol.identity import Identity
from tests.integration.cluster import Cluster, wait_for

FLAGS = [
    "--set",
    "p2p.enabled=true",
    "--set",
    "run.group_size=4",
    "--set",
    "run.prompts_per_lease=2",
    "--set",
    "run.sampling.max_tokens=8",
    "--set",
    "run.max_backlog_groups=0",
]


def test_nodes_follow_the_policy_through_the_peer_network(tmp_path, tiny_model):
    from policy.model import load_model
    from policy.weights import export_bf16_state
    from tests.adversarial.test_attacks import perturbed
    from trainer.client import TrainerClient
    from trainer.publish import PolicyPublisher

    cluster = Cluster(tmp_path, tiny_model, Identity.generate())
    try:
        cluster.publish_fixed_policy()
        cluster.start_coordinator(*FLAGS)
        nodes = [cluster.start_node(f"peer-{i}", "--set", "p2p.enabled=true", "--batch-size", "8") for i in range(2)]
        for node in nodes:
            wait_for(
                lambda node=node: "fetched through the peer network" in node.log(), 120, f"{node.name} to use the peers"
            )
        wait_for(
            lambda: cluster.query("SELECT COALESCE(SUM(num_rollouts_accepted), 0) FROM nodes")[0][0] >= 16,
            120,
            "accepted rollouts",
        )

        model = load_model(tiny_model)
        client = TrainerClient(cluster.address, cluster.trainer_identity, tls=cluster.coordinator_tls)
        publisher = PolicyPublisher(cluster.trainer_identity, "demo", client)
        publisher.resume(1, export_bf16_state(model))
        publisher.publish_model(2, perturbed(model, 1.02))
        client.close()
        for node in nodes:
            wait_for(lambda node=node: "policy version 2 applied" in node.log(), 120, f"{node.name} to apply version 2")
            assert "policy version 2: " in node.log() and "fetched through the peer network" in node.log()
    finally:
        cluster.stop_all()
