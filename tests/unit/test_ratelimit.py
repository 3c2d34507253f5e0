"""Token buckets (digest §11), named limiters, and the client address used for per-IP limits."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from mailslot.api.auth import client_ip
from mailslot.app import create_app
from mailslot.backends.memory.ratelimit import MemoryRateLimitBackend
from mailslot.config import RateLimitSettings
from mailslot.services.ratelimit import DEFAULT_LIMITS, RateLimiters, RateLimitExceeded
from mailslot.wiring import parse_networks
from tests.conftest import make_settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def bucket(clock: FakeClock) -> MemoryRateLimitBackend:
    return MemoryRateLimitBackend(clock=clock)


# -- the bucket ----------------------------------------------------------------------------------


async def test_full_bucket_allows_capacity_then_refuses(bucket: MemoryRateLimitBackend) -> None:
    for _ in range(3):
        assert await bucket.take("k", 3, 10.0, 1) is None
    assert await bucket.take("k", 3, 10.0, 1) == pytest.approx(10.0)


async def test_refill_is_one_permit_per_interval(bucket: MemoryRateLimitBackend, clock: FakeClock) -> None:
    for _ in range(3):
        await bucket.take("k", 3, 10.0, 1)
    clock.now += 4.0
    assert await bucket.take("k", 3, 10.0, 1) == pytest.approx(6.0)
    clock.now += 6.0
    assert await bucket.take("k", 3, 10.0, 1) is None
    assert await bucket.take("k", 3, 10.0, 1) == pytest.approx(10.0)


async def test_refill_never_exceeds_capacity(bucket: MemoryRateLimitBackend, clock: FakeClock) -> None:
    await bucket.take("k", 2, 1.0, 2)
    clock.now += 1000
    assert await bucket.take("k", 2, 1.0, 1) is None
    assert await bucket.take("k", 2, 1.0, 1) is None
    assert await bucket.take("k", 2, 1.0, 1) == pytest.approx(1.0)


async def test_several_permits_at_once(bucket: MemoryRateLimitBackend, clock: FakeClock) -> None:
    assert await bucket.take("bytes", 100, 0.5, 60) is None
    assert await bucket.take("bytes", 100, 0.5, 60) == pytest.approx(20 * 0.5)
    clock.now += 10
    assert await bucket.take("bytes", 100, 0.5, 60) is None


async def test_keys_are_independent(bucket: MemoryRateLimitBackend) -> None:
    assert await bucket.take("a", 1, 60, 1) is None
    assert await bucket.take("a", 1, 60, 1) is not None
    assert await bucket.take("b", 1, 60, 1) is None


async def test_refused_take_consumes_nothing(bucket: MemoryRateLimitBackend, clock: FakeClock) -> None:
    await bucket.take("k", 2, 10, 2)
    for _ in range(5):
        assert await bucket.take("k", 2, 10, 1) is not None
    clock.now += 10
    assert await bucket.take("k", 2, 10, 1) is None


async def test_reset_fills_the_bucket(bucket: MemoryRateLimitBackend) -> None:
    await bucket.take("k", 1, 60, 1)
    await bucket.reset("k")
    assert await bucket.take("k", 1, 60, 1) is None


async def test_eviction_bounds_memory(clock: FakeClock) -> None:
    bucket = MemoryRateLimitBackend(clock=clock, max_keys=10)
    for i in range(50):
        clock.now += 0.001
        await bucket.take(f"k{i}", 5, 60, 1)
    assert len(bucket._buckets) <= 10


async def test_zero_permit_seconds_means_unlimited_refill(bucket: MemoryRateLimitBackend, clock: FakeClock) -> None:
    await bucket.take("k", 1, 0.0, 1)
    clock.now += 0.0001
    assert await bucket.take("k", 1, 0.0, 1) is None


# -- named limiters ------------------------------------------------------------------------------


async def test_limiters_use_defaults_and_overrides(clock: FakeClock) -> None:
    limiters = RateLimiters(MemoryRateLimitBackend(clock=clock),
                            {"registration": RateLimitSettings(capacity=2, permit_seconds=100)})
    assert limiters.limits["pin"] == DEFAULT_LIMITS["pin"]
    assert limiters.limits["registration"].capacity == 2
    await limiters.check("registration", "+15555550001")
    await limiters.check("registration", "+15555550001")
    with pytest.raises(RateLimitExceeded) as info:
        await limiters.check("registration", "+15555550001")
    assert info.value.limiter == "registration"
    assert info.value.retry_after == pytest.approx(100)
    assert info.value.retry_after_seconds == 100
    await limiters.check("registration", "+15555550002")  # another key
    await limiters.check("pin", "+15555550001")  # another limiter, same key


async def test_limiter_names_do_not_collide(clock: FakeClock) -> None:
    limiters = RateLimiters(MemoryRateLimitBackend(clock=clock), {
        "pin": RateLimitSettings(capacity=1, permit_seconds=60),
        "checkTotp": RateLimitSettings(capacity=1, permit_seconds=60),
    })
    await limiters.check("pin", "x")
    await limiters.check("checkTotp", "x")
    with pytest.raises(RateLimitExceeded):
        await limiters.check("pin", "x")


async def test_more_permits_than_capacity_never_succeed(clock: FakeClock) -> None:
    limiters = RateLimiters(MemoryRateLimitBackend(clock=clock), {})
    with pytest.raises(RateLimitExceeded) as info:
        await limiters.check("pin", "x", permits=11)
    assert info.value.retry_after is None and info.value.retry_after_seconds is None


async def test_limiter_reset(clock: FakeClock) -> None:
    limiters = RateLimiters(MemoryRateLimitBackend(clock=clock),
                            {"pin": RateLimitSettings(capacity=1, permit_seconds=60)})
    await limiters.check("pin", "x")
    await limiters.reset("pin", "x")
    await limiters.check("pin", "x")


@pytest.mark.parametrize(("wait", "seconds"), [(0.01, 1), (1.0, 1), (1.2, 2), (59.999, 60)])
def test_retry_after_rounds_up_to_whole_seconds(wait: float, seconds: int) -> None:
    assert RateLimitExceeded("x", wait).retry_after_seconds == seconds


def test_unknown_limiter_is_a_programming_error() -> None:
    limiters = RateLimiters(MemoryRateLimitBackend(), {})

    import asyncio

    with pytest.raises(KeyError):
        asyncio.run(limiters.check("noSuchLimiter", "x"))


def test_defaults_follow_the_digest() -> None:
    expected = {"registration": (6, 30), "pin": (10, 86400), "checkTotp": (5, 6), "checkAccountExistence": (1000, 4),
                "messages": (60, 1), "prekeys": (6, 600)}
    for name, (capacity, seconds) in expected.items():
        assert (DEFAULT_LIMITS[name].capacity, DEFAULT_LIMITS[name].permit_seconds) == (capacity, seconds)


# -- client address ------------------------------------------------------------------------------


def fake_request(peer: str | None, forwarded: str | None, trusted: list[str]) -> Request:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded is not None else []
    app = SimpleNamespace(state=SimpleNamespace(services=SimpleNamespace(trusted_proxies=parse_networks(trusted))))
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/", "headers": headers, "app": app,
                             "client": (peer, 1234) if peer is not None else None}
    return Request(scope)


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("203.0.113.5", None, [], "203.0.113.5"),
        ("203.0.113.5", "198.51.100.7", [], "203.0.113.5"),  # no trusted proxies: header ignored
        ("203.0.113.5", "198.51.100.7", ["10.0.0.0/8"], "203.0.113.5"),  # peer is not a trusted proxy
        ("10.0.0.2", "198.51.100.7", ["10.0.0.0/8"], "198.51.100.7"),
        ("10.0.0.2", "1.1.1.1, 198.51.100.7", ["10.0.0.0/8"], "198.51.100.7"),  # nearest untrusted hop
        ("10.0.0.2", "1.1.1.1, 198.51.100.7, 10.0.0.9", ["10.0.0.0/8"], "198.51.100.7"),
        ("10.0.0.2", "10.0.0.8, 10.0.0.9", ["10.0.0.0/8"], "10.0.0.8"),  # all trusted: the farthest
        ("10.0.0.2", "", ["10.0.0.0/8"], "10.0.0.2"),
        ("10.0.0.2", None, ["10.0.0.0/8"], "10.0.0.2"),
        ("10.0.0.2", "garbage, 198.51.100.7", ["10.0.0.2/32"], "198.51.100.7"),
        ("::1", "2001:db8::1", ["::1"], "2001:db8::1"),
        ("::ffff:10.0.0.2", "198.51.100.7", ["10.0.0.0/8"], "198.51.100.7"),  # IPv4-mapped proxy peer
        ("testclient", "198.51.100.7", ["10.0.0.0/8"], "testclient"),
        (None, "198.51.100.7", [], "0.0.0.0"),
    ],
)
def test_client_ip(peer: str | None, forwarded: str | None, trusted: list[str], expected: str) -> None:
    assert client_ip(fake_request(peer, forwarded, trusted)) == expected


def test_client_ip_spoofed_hop_is_not_believed() -> None:
    """A client that writes its own X-Forwarded-For cannot pick the address the limiter sees."""
    request = fake_request("10.0.0.2", "6.6.6.6, 198.51.100.7", ["10.0.0.0/8"])
    assert client_ip(request) == "198.51.100.7"


def test_parse_networks() -> None:
    networks = parse_networks(["10.0.0.1", "192.168.0.0/16", "::1"])
    assert networks[0] == ipaddress.ip_network("10.0.0.1/32")
    assert ipaddress.ip_address("192.168.4.4") in networks[1]


# -- at the HTTP level ---------------------------------------------------------------------------


def _head_status(client: TestClient, forwarded: str) -> Any:
    return client.head("/v1/accounts/account/00000000-0000-4000-8000-000000000000",
                       headers={"X-Forwarded-For": forwarded})


def test_per_ip_limit_uses_forwarded_for_behind_a_trusted_proxy(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    limits = {"checkAccountExistence": {"capacity": 1, "permit_seconds": 3600}}
    settings = make_settings("sqlite", tmp_path, request, rate_limits=limits,
                             server={"trusted_proxies": ["10.0.0.0/8"]})
    with TestClient(create_app(settings), client=("10.1.2.3", 4000)) as client:
        assert _head_status(client, "198.51.100.1").status_code == 404
        response = _head_status(client, "198.51.100.1")
        assert response.status_code == 429
        assert 3500 <= int(response.headers["Retry-After"]) <= 3600
        assert _head_status(client, "198.51.100.2").status_code == 404  # another client behind the proxy


def test_forwarded_for_is_ignored_from_untrusted_peers(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    limits = {"checkAccountExistence": {"capacity": 1, "permit_seconds": 3600}}
    settings = make_settings("sqlite", tmp_path, request, rate_limits=limits,
                             server={"trusted_proxies": ["10.0.0.0/8"]})
    with TestClient(create_app(settings)) as client:  # peer "testclient"
        assert _head_status(client, "198.51.100.1").status_code == 404
        assert _head_status(client, "198.51.100.2").status_code == 429  # a new header does not buy a new bucket


async def test_check_many_takes_in_order_and_names_the_first_refusal() -> None:
    from mailslot.backends.memory.ratelimit import MemoryRateLimitBackend
    from mailslot.config import RateLimitSettings
    from mailslot.services.ratelimit import RateLimiters, RateLimitExceeded

    limiters = RateLimiters(MemoryRateLimitBackend(), {"messages": RateLimitSettings(capacity=2, permit_seconds=60),
                                                       "profile": RateLimitSettings(capacity=1, permit_seconds=60)})
    await limiters.check_many([("messages", "a", 1), ("profile", "a", 1)])
    try:
        await limiters.check_many([("messages", "a", 1), ("profile", "a", 1)])
    except RateLimitExceeded as exc:
        assert exc.limiter == "profile" and exc.retry_after is not None
    else:
        raise AssertionError("the second profile permit must be refused")
    # The first bucket gave before the second refused (as two checks in a row would have).
    try:
        await limiters.check("messages", "a")
    except RateLimitExceeded as exc:
        assert exc.limiter == "messages"
    else:
        raise AssertionError("messages must be used up")
    try:
        await limiters.check_many([("profile", "b", 2)])
    except RateLimitExceeded as exc:
        assert exc.retry_after is None  # more than the bucket holds: never
    else:
        raise AssertionError("more permits than the capacity must be refused")
