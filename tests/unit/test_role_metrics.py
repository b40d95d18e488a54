from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from node.daemon import NodeStatus
from node.metrics import NodeStatusCollector
from trainer.metrics import TrainerMetricsCollector


def _scrape(collector) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_node_metrics_follow_its_status():
    status = NodeStatus(
        node_id="n", link="connected", policy_version=7, num_rollouts_accepted=40, tokens_per_second=12.5
    )
    samples = _scrape(NodeStatusCollector(lambda: status))
    assert samples["rollproof_node_policy_version"] == 7
    assert samples["rollproof_node_rollouts_accepted_total"] == 40
    assert samples["rollproof_node_connected"] == 1.0
    status.policy_version = 8
    assert _scrape(NodeStatusCollector(lambda: status))["rollproof_node_policy_version"] == 8


def test_trainer_metrics_keep_the_latest_value_of_each_figure():
    collector = TrainerMetricsCollector()
    collector.update({"step": 3, "reward_mean": 0.25, "staleness": {"1": 8}, "eval_reward": None})
    collector.update({"step": 4, "loss": -0.1})
    samples = _scrape(collector)
    assert samples == {
        "rollproof_trainer_step": 4.0,
        "rollproof_trainer_reward_mean": 0.25,
        "rollproof_trainer_loss": -0.1,
    }
