"""Two server instances in one test process, sharing PostgreSQL and Redis: cross-node wake-ups,
displacement, long-polls, shared rate limits, account-cache invalidation, and life without Redis.

The real-process tests (three `mailslot serve` nodes, SIGKILL) are in tests/cluster; these check the
same paths quickly and in detail. The sweep is off (sweep_seconds = 0) so that only the bus can make a
cross-node delivery happen.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fastapi.testclient import TestClient

from mailslot.app import create_app
from mailslot.backends.redis.bus import client_for, connect
from mailslot.backends.redis.ratelimit import RedisRateLimitBackend
from mailslot.protocol.envelope_pb2 import Envelope
from mailslot.stores.models import NewMessage
from tests.api.delivery_support import Device, message, send
from tests.api.foundation_support import call, services
from tests.conftest import make_settings
from tests.helpers import b64, register

REDIS_URL = os.environ.get("MAILSLOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SOCKET = "/v1/websocket/"
T = TypeVar("T")

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


async def _redis_ping(url: str) -> None:
    client = client_for(url)
    try:
        async with asyncio.timeout(2):
            await client.ping()  # type: ignore[misc]
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        asyncio.run(_redis_ping(REDIS_URL))
    except Exception:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis is not reachable at {REDIS_URL} and CI=true: refusing to skip")
        pytest.skip("Redis is not reachable")
    return REDIS_URL


@pytest.fixture
def prefix() -> str:
    return f"mailslot-test-{secrets.token_hex(4)}"


@pytest.fixture
def nodes(tmp_path: Path, request: pytest.FixtureRequest, redis_url: str, prefix: str) -> Iterator[list[TestClient]]:
    cluster = {"redis_url": redis_url, "key_prefix": prefix, "sweep_seconds": 0}
    limits = {
        "waitForLinkedDevice": {"capacity": 100, "permit_seconds": 1},
        "prekeys": {"capacity": 2, "permit_seconds": 600},
    }
    first = make_settings("postgres", tmp_path, request, cluster=cluster, rate_limits=limits)
    second = make_settings("postgres", tmp_path, request, truncate=False, cluster=cluster, rate_limits=limits)
    with TestClient(create_app(first)) as one, TestClient(create_app(second)) as two:
        yield [one, two]


def test_a_send_on_one_node_reaches_a_socket_on_the_other_at_once(nodes: list[TestClient]) -> None:
    one, two = nodes
    alice, bob = register(one, "+15555550001"), register(one, "+15555550002")
    with two.websocket_connect(SOCKET, headers=bob.auth) as ws:
        device = Device(ws)
        device.expect_queue_empty()
        started = time.monotonic()
        assert send(one, alice, bob, message(b"across")).status_code == 200
        (envelope,) = device.envelopes(1)
        assert envelope.content == b"across"
        assert time.monotonic() - started < 5
        # The acknowledgement on node 2 queues alice's delivery receipt; it stays queued for her.
        assert send(one, alice, bob, message(b"second")).status_code == 200
        assert device.envelopes(1)[0].content == b"second"


def test_ephemeral_messages_cross_nodes_and_are_never_stored(nodes: list[TestClient]) -> None:
    one, two = nodes
    alice, bob = register(one, "+15555550001"), register(one, "+15555550002")
    with two.websocket_connect(SOCKET, headers=bob.auth) as ws:
        device = Device(ws)
        device.expect_queue_empty()
        assert send(one, alice, bob, message(b"typing"), online=True).status_code == 200
        (envelope,) = device.envelopes(1)
        assert envelope.content == b"typing"
    assert call(two, services(two).delivery.pending_count, uuid.UUID(bob.aci), 1) == 0


def test_a_newer_socket_on_another_node_displaces_the_older_one(nodes: list[TestClient]) -> None:
    one, two = nodes
    alice, bob = register(one, "+15555550001"), register(one, "+15555550002")
    with two.websocket_connect(SOCKET, headers=bob.auth) as old_ws:
        old = Device(old_ws)
        old.expect_queue_empty()
        with one.websocket_connect(SOCKET, headers=bob.auth) as new_ws:
            new = Device(new_ws)
            new.expect_queue_empty()
            with pytest.raises(Exception) as closed:
                old.next_request(timeout=5)
            assert getattr(closed.value, "code", None) == 4409
            assert send(two, alice, bob, message(b"to the new one")).status_code == 200
            assert new.envelopes(1)[0].content == b"to the new one"


def test_a_long_poll_on_one_node_wakes_for_a_send_on_the_other(nodes: list[TestClient]) -> None:
    one, two = nodes
    alice, bob = register(one, "+15555550001"), register(one, "+15555550002")
    result: dict[str, object] = {}

    def poll() -> None:
        started = time.monotonic()
        result["response"] = two.get("/v1/messages?timeout=20", headers=bob.auth)
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.5)
    assert send(one, alice, bob, message(b"polled")).status_code == 200
    thread.join(10)
    assert not thread.is_alive()
    body = result["response"].json()  # type: ignore[attr-defined]
    assert len(body["messages"]) == 1
    assert float(result["seconds"]) < 10  # type: ignore[arg-type]


def test_rate_limits_are_shared_by_the_nodes(nodes: list[TestClient]) -> None:
    one, two = nodes
    alice, bob = register(one, "+15555550001"), register(one, "+15555550002")
    # prekeys: capacity 2 in this cluster's configuration, per (caller, target) over both nodes.
    statuses = [client.get(f"/v2/keys/{bob.aci}/1", headers=alice.auth).status_code for client in (one, two, one, two)]
    assert statuses[:2] == [200, 200] and statuses[2:] == [429, 429]


def test_removing_a_device_closes_its_socket_on_another_node_with_4401(nodes: list[TestClient]) -> None:
    one, two = nodes
    bob = register(one, "+15555550002")
    from tests.api.foundation_support import add_linked_device

    linked = add_linked_device(one, bob.aci)
    with two.websocket_connect(SOCKET, headers=linked) as ws:
        device = Device(ws)
        device.expect_queue_empty()
        assert one.delete("/v1/devices/2", headers=bob.auth).status_code in (200, 204)
        with pytest.raises(Exception) as closed:
            device.next_request(timeout=5)
        assert getattr(closed.value, "code", None) == 4401
    # The other node's account cache was told: the removed device's credentials fail there at once.
    assert two.get("/v1/devices", headers=linked).status_code == 401


async def test_the_rate_limit_script_refills_over_time_and_shares_buckets(redis_url: str, prefix: str) -> None:
    first = RedisRateLimitBackend(client_for(redis_url), prefix)
    second = RedisRateLimitBackend(client_for(redis_url), prefix)
    try:
        assert await first.take("k", 2, 0.2, 1) is None
        assert await second.take("k", 2, 0.2, 1) is None
        wait = await first.take("k", 2, 0.2, 1)
        assert wait is not None and 0 < wait <= 0.2
        await asyncio.sleep(0.25)
        assert await second.take("k", 2, 0.2, 1) is None
        await first.reset("k")
        assert await second.take("k", 2, 0.2, 2) is None
    finally:
        await first.client.aclose()
        await second.client.aclose()


async def test_without_redis_rate_limits_fall_back_to_the_node(prefix: str) -> None:
    backend = RedisRateLimitBackend(client_for("redis://127.0.0.1:1/0"), prefix)
    try:
        assert await backend.take("k", 1, 60, 1) is None
        assert await backend.take("k", 1, 60, 1) is not None
    finally:
        await backend.client.aclose()


async def test_the_bus_counts_subscribers_and_stops_delivering_after_the_last_unsubscribe(
    redis_url: str, prefix: str
) -> None:
    bus = await connect(redis_url, prefix)
    try:
        got: list[bytes] = []
        channel = bus.channel("t")
        first = bus.subscribe(channel, got.append)
        second = bus.subscribe(channel, got.append)
        await bus.ready(channel)
        assert await bus.publish(channel, b"one") == 1  # one Redis subscription for both handlers
        for _ in range(100):
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        assert got == [b"one", b"one"]
        bus.unsubscribe(channel, first)
        bus.unsubscribe(channel, second)
        for _ in range(100):
            if await bus.publish(channel, b"two") == 0:
                break
            await asyncio.sleep(0.01)
        assert await bus.publish(channel, b"two") == 0
        await bus.ping()
    finally:
        await bus.close()


def test_a_provisioning_message_reaches_a_socket_on_the_other_node(nodes: list[TestClient]) -> None:
    from tests.api.test_provisioning import PATH, next_request, read_address

    one, two = nodes
    alice = register(one, "+15555550001")
    with two.websocket_connect(PATH) as ws:
        address = read_address(ws)
        response = one.put(f"/v1/provisioning/{address}", json={"body": b64(b"provision me")}, headers=alice.auth)
        assert response.status_code == 204, response.text
        request = next_request(ws)
        assert (request.verb, request.path, request.body) == ("PUT", "/v1/message", b"provision me")
    # Once the socket is gone nobody listens anywhere.
    response = one.put(f"/v1/provisioning/{address}", json={"body": b64(b"late")}, headers=alice.auth)
    assert response.status_code == 404


def test_a_link_wait_on_one_node_wakes_when_the_device_links_on_the_other(nodes: list[TestClient]) -> None:
    from mailslot.services.devices import token_identifier
    from tests.api.test_devices import link_body, new_code, put_link

    one, two = nodes
    alice = register(one, "+15555550001")
    code = new_code(one, alice)
    result: dict[str, object] = {}

    def wait() -> None:
        result["response"] = two.get(
            f"/v1/devices/wait_for_linked_device/{token_identifier(code)}?timeout=20", headers=alice.auth
        )

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.5)
    assert put_link(one, alice, link_body(alice, code)).status_code == 200
    thread.join(10)
    assert not thread.is_alive()
    response = result["response"]
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    assert response.json()["id"] == 2  # type: ignore[attr-defined]
    # Asked again later (on either node), the answer is still there.
    again = one.get(f"/v1/devices/wait_for_linked_device/{token_identifier(code)}?timeout=1", headers=alice.auth)
    assert again.status_code == 200 and again.json()["id"] == 2


class CuttableProxy:
    """A TCP proxy to Redis that a test can cut (every connection dropped, new ones refused) and restore."""

    def __init__(self, target_port: int = 6379) -> None:
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.flowing = self._run(self._event())
        self.port = self._run(self._listen(0))

    async def _event(self) -> asyncio.Event:
        event = asyncio.Event()
        event.set()
        return event

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _listen(self, port: int) -> int:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", port)
        return int(self.server.sockets[0].getsockname()[1])

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers.update((writer, up_writer))

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    await self.flowing.wait()  # frozen: bytes stop, the connections stay open
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))

    async def _cut(self) -> None:
        assert self.server is not None
        self.flowing.set()
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    def cut(self) -> None:
        self._run(self._cut())

    def restore(self) -> None:
        self._run(self._listen(self.port))

    def freeze(self) -> None:
        self.loop.call_soon_threadsafe(self.flowing.clear)

    def thaw(self) -> None:
        self.loop.call_soon_threadsafe(self.flowing.set)

    def close(self) -> None:
        self._run(self._cut())
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_a_node_that_loses_redis_says_so_keeps_serving_and_catches_up_when_it_returns(
    tmp_path: Path, request: pytest.FixtureRequest, redis_url: str, prefix: str
) -> None:
    proxy = CuttableProxy()
    try:
        direct = {"redis_url": redis_url, "key_prefix": prefix, "sweep_seconds": 0}
        proxied = {**direct, "redis_url": f"redis://127.0.0.1:{proxy.port}/0"}
        first = make_settings("postgres", tmp_path, request, cluster=direct)
        second = make_settings("postgres", tmp_path, request, truncate=False, cluster=proxied)
        with TestClient(create_app(first)) as one, TestClient(create_app(second)) as two:
            alice, bob = register(one, "+15555550001"), register(one, "+15555550002")
            assert two.get("/health/ready").status_code == 200
            with two.websocket_connect(SOCKET, headers=bob.auth) as ws:
                device = Device(ws)
                device.expect_queue_empty()
                proxy.cut()
                ready = two.get("/health/ready")
                assert ready.status_code == 503 and ready.json()["checks"]["redis"] == "unavailable"
                # Node 2 still serves what needs no Redis (rate limits fall back to the node) ...
                assert two.get(f"/v2/keys/{alice.aci}/1", headers=bob.auth).status_code == 200
                # ... and a message sent meanwhile is stored; its wake-up cannot reach node 2.
                assert send(one, alice, bob, message(b"while away")).status_code == 200
                with pytest.raises(TimeoutError):
                    device.next_request(timeout=1.0)
                proxy.restore()
                # Back: node 2 resubscribes and every socket reads its queue again.
                assert device.envelopes(1)[0].content == b"while away"
                deadline = time.monotonic() + 10
                while two.get("/health/ready").status_code != 200 and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert two.get("/health/ready").status_code == 200
                assert send(one, alice, bob, message(b"after")).status_code == 200
                assert device.envelopes(1)[0].content == b"after"
    finally:
        proxy.close()


def test_the_sweep_rereads_queues_even_without_a_wake_up(
    tmp_path: Path, request: pytest.FixtureRequest, redis_url: str, prefix: str
) -> None:
    cluster = {"redis_url": redis_url, "key_prefix": prefix, "sweep_seconds": 0.5}
    settings = make_settings("postgres", tmp_path, request, cluster=cluster)
    with TestClient(create_app(settings)) as one:
        bob = register(one, "+15555550002")
        with one.websocket_connect(SOCKET, headers=bob.auth) as ws:
            device = Device(ws)
            device.expect_queue_empty()
            # A row written behind the server's back (as if its wake-up had been lost).
            svc = services(one)
            store = svc.delivery.messages
            guid = uuid.uuid4()
            envelope = Envelope(type=Envelope.CIPHERTEXT, content=b"swept", server_guid=guid.bytes).SerializeToString()
            sealed = svc.delivery.keyring.seal(envelope, svc.delivery._row_ad(uuid.UUID(bob.aci), 1, guid))
            row = NewMessage(uuid.UUID(bob.aci), 1, guid, sealed, int(time.time()) + 3600)
            call(one, store.apply, [row], [], [])
            assert device.envelopes(1)[0].content == b"swept"


def test_a_group_request_replayed_on_another_node_is_refused(nodes: list[TestClient]) -> None:
    from mailslot.client import groups as g
    from tests.api.group_support import Group

    one, two = nodes
    group = Group(one)
    group.create()
    _, headers = g.signed(group.admin, group.gid, "GET", group.path())
    assert one.get(group.path(), headers=headers).status_code == 200
    replay = two.get(group.path(), headers=headers)
    assert replay.status_code == 401 and "already used" in replay.json()["message"]
    # An admin action on one node is in force on the other at the next request.
    assert group.patch(group.admin, g.remove_member(group.member.public)).status_code == 200
    _, member_headers = g.signed(group.member, group.gid, "GET", group.path())
    assert two.get(group.path(), headers=member_headers).status_code == 403


def test_a_block_on_one_node_is_in_force_on_the_other_at_once(nodes: list[TestClient]) -> None:
    one, two = nodes
    alice, bob = register(one, "+15555550001"), register(one, "+15555550002")
    assert send(two, bob, alice, message(b"warm the cache")).status_code == 200
    assert one.put(f"/v1/accounts/blocks/{bob.aci}", headers=alice.auth).status_code == 204
    assert send(two, bob, alice, message(b"dropped")).status_code == 200
    assert one.delete(f"/v1/accounts/blocks/{bob.aci}", headers=alice.auth).status_code == 204
    assert send(two, bob, alice, message(b"delivered")).status_code == 200
    with one.websocket_connect(SOCKET, headers=alice.auth) as ws:
        contents = [e.content for e in Device(ws).envelopes(2)]
    assert contents == [b"warm the cache", b"delivered"]


def test_a_silent_redis_connection_is_noticed_and_replaced(
    tmp_path: Path, request: pytest.FixtureRequest, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A half-open connection (no reset, no bytes) looks quiet forever unless the bus pings; it must
    be declared lost, reported by /health/ready, and replaced once Redis answers again."""
    from mailslot.backends.redis import bus as bus_module

    monkeypatch.setattr(bus_module, "PING_SECONDS", 0.2)
    proxy = CuttableProxy()
    try:
        proxied = {"redis_url": f"redis://127.0.0.1:{proxy.port}/0", "key_prefix": prefix, "sweep_seconds": 0}
        with TestClient(create_app(make_settings("postgres", tmp_path, request, cluster=proxied))) as node:
            assert node.get("/health/ready").status_code == 200
            bus = services(node).delivery.presence.bus  # type: ignore[attr-defined]
            proxy.freeze()
            deadline = time.monotonic() + 10
            while bus.healthy and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not bus.healthy  # the subscriber noticed by itself, without any request
            assert node.get("/health/ready").json()["checks"]["redis"] == "unavailable"
            proxy.thaw()
            deadline = time.monotonic() + 10
            while node.get("/health/ready").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert node.get("/health/ready").status_code == 200
    finally:
        proxy.close()


async def test_the_rate_limit_script_takes_several_buckets_in_one_call(redis_url: str, prefix: str) -> None:
    backend = RedisRateLimitBackend(client_for(redis_url), prefix)
    try:
        assert await backend.take_many([("a", 2, 60, 1), ("b", 1, 60, 1)]) is None
        refused = await backend.take_many([("a", 2, 60, 1), ("b", 1, 60, 1)])
        assert refused is not None and refused[0] == 1 and 0 < refused[1] <= 60
        assert await backend.take("a", 2, 60, 1) is not None  # "a" gave its second permit before "b" refused
        assert await backend.take_many([("c", 1, 0, 1), ("c", 1, 0, 1)]) is None  # no refill time: always full
    finally:
        await backend.client.aclose()
