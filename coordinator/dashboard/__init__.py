"""The coordinator's public dashboard, JSON API and Prometheus metrics (coordinator.dashboard.web)."""
