"""Prometheus metrics (``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    "mailslot_http_requests_total", "Requests by route template, method and status (HTTP and tunnelled)",
    ["route", "method", "status", "transport"], registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "mailslot_http_request_seconds", "Request handling time", ["route"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
WEBSOCKETS = Gauge(
    "mailslot_websocket_connections", "Open WebSocket connections", ["kind"], registry=REGISTRY,
)
