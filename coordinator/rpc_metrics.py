"""This process's gRPC metrics for /metrics: handling time by method and outcome. They are
recorded where the gRPC layer sees a request (GuardInterceptor), so each coordinator process
reports its own; the run's counters come from the store (coordinator/dashboard/prometheus.py)."""

from __future__ import annotations

from prometheus_client import Histogram

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def rpc_latency_histogram() -> Histogram:
    """Labels: the RPC's full method name (bounded by the services) and its status code name."""
    return Histogram(
        "rollproof_rpc_duration_seconds",
        "gRPC request handling time, by method and status code.",
        ["method", "code"],
        buckets=LATENCY_BUCKETS_S,
        registry=None,
    )
