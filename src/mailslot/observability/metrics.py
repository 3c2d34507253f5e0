"""Prometheus metrics (``/metrics``)."""

from __future__ import annotations

import time

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
DEPENDENCY_UP = Gauge(
    "mailslot_dependency_up",
    "1 when the last readiness check of a dependency (storage, storage:<shard>, redis) passed, else 0;"
    " set by GET /health/ready",
    ["dependency"], registry=REGISTRY,
)
MESSAGES_STORED = Counter(
    "mailslot_messages_stored", "Envelopes committed to a device queue (messages and delivery receipts)",
    registry=REGISTRY,
)
DELIVERY_LATENCY = Histogram(
    "mailslot_delivery_seconds",
    "Time from an envelope's acceptance (its server timestamp) to the receiving device's acknowledgement;"
    " path=live: handed to a connected socket, path=queued: read back from the queue (the device was away)",
    ["path"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0),
)


DELIVERY_PATHS = ("live", "queued")
for _path in DELIVERY_PATHS:  # both series exist (empty) from the start, for dashboards and alerts
    DELIVERY_LATENCY.labels(_path)


def observe_delivery(server_timestamp_ms: int, path: str) -> None:
    """One acknowledged envelope: its age since the server accepted it (``Envelope.server_timestamp``, ms).

    ``path`` is ``"live"`` when the envelope reached a socket that was connected when it was stored (in
    memory, over the bus from another node), ``"queued"`` when it was read back from the queue.
    """
    if server_timestamp_ms > 0:
        DELIVERY_LATENCY.labels(path).observe(max(0.0, time.time() - server_timestamp_ms / 1000))
