"""The trainer's optional Prometheus endpoint (`metrics_port`): the last step's figures."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

EXPORTED = {
    "step": "trainer step",
    "policy_version": "latest published policy version",
    "reward_mean": "mean reward of the last step's groups",
    "eval_reward": "last held-out reward of the published policy",
    "loss": "last loss",
    "masked_fraction": "fraction of tokens masked for an out-of-bounds importance ratio",
    "logprob_mismatch": "mean |trainer - node| log-probability of the last step",
    "tokens_per_second": "training tokens per second",
    "wait_seconds": "time the last step waited for rollouts",
    "num_groups_stale_total": "groups dropped as too stale",
}


class TrainerMetricsCollector(Collector):
    def __init__(self):
        self.latest: dict[str, float] = {}

    def update(self, record: dict) -> None:
        self.latest.update({k: float(v) for k, v in record.items() if k in EXPORTED and v is not None})

    def collect(self) -> Iterator:
        for key, value in self.latest.items():
            yield GaugeMetricFamily(f"rollproof_trainer_{key}", EXPORTED[key], value)


def serve_metrics(port: int, host: str = "127.0.0.1") -> TrainerMetricsCollector:
    from prometheus_client import start_http_server

    collector = TrainerMetricsCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    start_http_server(port, addr=host, registry=registry)
    return collector
