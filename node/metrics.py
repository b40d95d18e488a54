"""The node's optional Prometheus endpoint (`metrics_port`): its status as gauges and counters."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry


class NodeStatusCollector(Collector):
    def __init__(self, status: Callable[[], object]):
        self.status = status

    def collect(self) -> Iterator:
        status = self.status()
        yield GaugeMetricFamily("rollproof_node_policy_version", "policy version the node holds", status.policy_version)
        yield GaugeMetricFamily("rollproof_node_tokens_per_second", "generation speed", status.tokens_per_second)
        yield GaugeMetricFamily(
            "rollproof_node_batches_spooled", "batches waiting for a receipt", status.num_batches_spooled
        )
        yield GaugeMetricFamily(
            "rollproof_node_connected", "1 while the coordinator answers", float(status.link == "connected")
        )
        yield CounterMetricFamily("rollproof_node_tokens_generated", "tokens generated", status.num_tokens_generated)
        yield CounterMetricFamily("rollproof_node_rollouts_accepted", "rollouts accepted", status.num_rollouts_accepted)
        yield CounterMetricFamily("rollproof_node_rollouts_rejected", "rollouts rejected", status.num_rollouts_rejected)


def serve_metrics(port: int, status: Callable[[], object], host: str = "127.0.0.1") -> None:
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    registry.register(NodeStatusCollector(status))
    start_http_server(port, addr=host, registry=registry)
