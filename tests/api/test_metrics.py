"""The cluster metrics on GET /metrics: dependency gauges, stored messages and delivery latency."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from mailslot.observability.metrics import DELIVERY_PATHS, observe_delivery


def _samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_new_metrics_are_exported(client: TestClient) -> None:
    names = {name for name, _ in _samples(client)}
    assert "mailslot_messages_stored_total" in names
    for suffix in ("_bucket", "_sum", "_count"):
        assert "mailslot_delivery_seconds" + suffix in names
    samples = _samples(client)
    for path in DELIVERY_PATHS:
        assert ("mailslot_delivery_seconds_count", (("path", path),)) in samples


def test_readiness_sets_dependency_gauges(client: TestClient) -> None:
    assert client.get("/health/ready").status_code == 200
    checks = client.app.state.services.readiness_checks  # type: ignore[attr-defined]
    assert "storage" in checks
    samples = _samples(client)
    assert samples[("mailslot_dependency_up", (("dependency", "storage"),))] == 1.0

    async def broken() -> None:
        raise ConnectionError("down")

    checks["test_broken"] = broken
    try:
        response = client.get("/health/ready")
        assert response.status_code == 503
        assert response.json()["checks"]["test_broken"] == "unavailable"
        samples = _samples(client)
        assert samples[("mailslot_dependency_up", (("dependency", "test_broken"),))] == 0.0
        assert samples[("mailslot_dependency_up", (("dependency", "storage"),))] == 1.0
    finally:
        del checks["test_broken"]


def test_observe_delivery_counts_by_path(client: TestClient) -> None:
    key = ("mailslot_delivery_seconds_count", (("path", "live"),))
    slow = ("mailslot_delivery_seconds_bucket", (("le", "1.0"), ("path", "live")))
    before = _samples(client)
    observe_delivery(int(time.time() * 1000) - 5_000, "live")  # 5 s old: above the 1 s bucket
    observe_delivery(0, "live")  # no server timestamp: not observed
    after = _samples(client)
    assert after[key] == before[key] + 1
    assert after[slow] == before[slow]


def test_sends_count_as_stored_and_acknowledgements_as_live_or_queued_deliveries(client: TestClient) -> None:
    from tests.api.delivery_support import Device, message, send
    from tests.helpers import register

    alice, bob = register(client, "+15555550001"), register(client, "+15555550002")
    before = _samples(client)

    Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

    def value(samples: Samples, name: str, path: str | None = None) -> float:
        return samples.get((name, (("path", path),) if path else ()), 0.0)

    assert send(client, alice, bob, message(b"queued")).status_code == 200  # bob is away: it waits in the queue
    with client.websocket_connect("/v1/websocket/", headers=bob.auth) as ws:
        device = Device(ws)
        assert device.envelopes(1)[0].content == b"queued"
        device.expect_queue_empty()
        assert send(client, alice, bob, message(b"live")).status_code == 200
        assert device.envelopes(1)[0].content == b"live"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = _samples(client)
        live = value(after, "mailslot_delivery_seconds_count", "live") - value(
            before, "mailslot_delivery_seconds_count", "live")
        stored = value(after, "mailslot_messages_stored_total") - value(before, "mailslot_messages_stored_total")
        if live >= 1 and stored >= 4:  # the last acknowledgement's receipt is committed after the socket closed
            break
        time.sleep(0.05)
    assert value(after, "mailslot_delivery_seconds_count", "queued") - value(
        before, "mailslot_delivery_seconds_count", "queued") == 1
    assert value(after, "mailslot_delivery_seconds_count", "live") - value(
        before, "mailslot_delivery_seconds_count", "live") == 1
    # Two messages, and the two delivery receipts their acknowledgements queued for alice.
    assert value(after, "mailslot_messages_stored_total") - value(before, "mailslot_messages_stored_total") == 4
