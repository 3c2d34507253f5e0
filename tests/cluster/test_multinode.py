"""Three real `mailslot serve` nodes on one PostgreSQL and one Redis: cross-node delivery, displacement,
long-polls, shared rate limits, provisioning and link waits.

The nodes sweep their sockets' queues only every 300 s, so anything that arrives across nodes within
a test's bound was carried by the Redis bus.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import httpx
import pytest

from tests.api.test_devices import link_body
from tests.cluster.cluster_support import (
    Cluster,
    ProvisioningSocket,
    Socket,
    message_body,
    mime_b64,
    register,
    send,
)
from tests.helpers import b64, basic

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

CROSS_NODE_SECONDS = 5.0  # generous; the sweep (300 s) cannot be what delivers within it


def client(node: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=node.http, timeout=30, trust_env=False)  # type: ignore[attr-defined]


async def test_a_send_on_node_1_reaches_a_socket_on_node_2_at_once(cluster: Cluster) -> None:
    alice, bob = register(cluster[1], cluster.number()), register(cluster[3], cluster.number())
    receiver = await Socket.open(cluster[2], bob.auth)
    try:
        async with client(cluster[1]) as http:
            for i in range(3):
                started = time.monotonic()
                response = await send(http, alice, bob, f"across {i}".encode(), timestamp=1000 + i)
                assert response.status_code == 200, response.text
                (*_, envelope) = await receiver.wait_for(i + 1, within=CROSS_NODE_SECONDS)
                assert envelope.content == f"across {i}".encode()
                assert time.monotonic() - started < CROSS_NODE_SECONDS
        assert [e.source_service_id_string for e in receiver.envelopes] == [alice.aci] * 3
        assert [e.client_timestamp for e in receiver.envelopes] == [1000, 1001, 1002]
        assert len({e.server_guid for e in receiver.envelopes}) == 3
    finally:
        await receiver.close()
    # Acknowledged on node 2: nothing is left queued (read over HTTP on node 3).
    async with client(cluster[3]) as http:
        assert (await http.get("/v1/messages", headers=bob.auth)).json()["messages"] == []


async def test_tunnelled_sends_from_node_1_and_3_reach_node_2_and_receipts_return_to_node_1(cluster: Cluster) -> None:
    """Sends tunnelled over sockets (the fast path) cross nodes too: identified from node 1, sealed from an
    anonymous socket on node 3, ephemeral from node 1; bob's acknowledgement on node 2 sends alice's
    delivery receipt to her socket on node 1."""
    alice, bob = register(cluster[1], cluster.number()), register(cluster[2], cluster.number())
    sender = await Socket.open(cluster[1], alice.auth)
    anonymous = await Socket.open(cluster[3], {}, wait_empty=False)
    receiver = await Socket.open(cluster[2], bob.auth)
    try:
        path = f"/v1/messages/{bob.aci}"
        response = await sender.request("PUT", path, message_body(b"identified", timestamp=4242))
        assert response.status == 200, response.body
        (identified,) = await receiver.wait_for(1, within=CROSS_NODE_SECONDS)
        assert (identified.type, identified.content, identified.source_service_id_string) == (
            1, b"identified", alice.aci)
        (receipt,) = await sender.wait_for(1, within=CROSS_NODE_SECONDS)
        assert (receipt.type, receipt.source_service_id_string, receipt.client_timestamp) == (5, bob.aci, 4242)

        response = await anonymous.request("PUT", path, message_body(b"sealed", kind=6),
                                           headers={"Unidentified-Access-Key": b64(bob.uak)})
        assert response.status == 200, response.body
        sealed = (await receiver.wait_for(2, within=CROSS_NODE_SECONDS))[1]
        assert (sealed.type, sealed.content) == (6, b"sealed")
        assert not sealed.HasField("source_service_id_string")

        response = await sender.request("PUT", path, message_body(b"typing", online=True))
        assert response.status == 200, response.body
        ephemeral = (await receiver.wait_for(3, within=CROSS_NODE_SECONDS))[2]
        assert ephemeral.content == b"typing"
    finally:
        for socket in (sender, anonymous, receiver):
            await socket.close()
    # Every one acknowledged, and the ephemeral one was never stored: bob's queue is empty.
    async with client(cluster[3]) as http:
        for _ in range(50):
            left = (await http.get("/v1/messages", headers=bob.auth)).json()["messages"]
            if not left:
                break
            await asyncio.sleep(0.1)
        assert left == []


async def test_a_block_on_node_1_applies_at_once_to_sends_on_node_2(cluster: Cluster) -> None:
    alice, bob = register(cluster[1], cluster.number()), register(cluster[1], cluster.number())
    receiver = await Socket.open(cluster[3], bob.auth)
    try:
        async with client(cluster[1]) as one, client(cluster[2]) as two:
            # Node 2 has alice and bob's accounts (and no block) in its caches.
            assert (await send(two, alice, bob, b"before")).status_code == 200
            assert [e.content for e in await receiver.wait_for(1, within=CROSS_NODE_SECONDS)] == [b"before"]
            assert (await one.put(f"/v1/accounts/blocks/{alice.aci}", headers=bob.auth)).status_code == 204
            blocked = await send(two, alice, bob, b"while blocked")
            assert blocked.status_code == 200, blocked.text  # the usual answer, delivered to nobody
            assert (await one.delete(f"/v1/accounts/blocks/{alice.aci}", headers=bob.auth)).status_code == 204
            assert (await send(two, alice, bob, b"after")).status_code == 200
            await receiver.wait_for(2, within=CROSS_NODE_SECONDS)
            await asyncio.sleep(0.5)
        assert [e.content for e in receiver.envelopes] == [b"before", b"after"]
    finally:
        await receiver.close()


async def test_a_socket_on_node_3_displaces_the_one_on_node_2_and_gets_the_new_messages(cluster: Cluster) -> None:
    alice, bob = register(cluster[1], cluster.number()), register(cluster[1], cluster.number())
    old = await Socket.open(cluster[2], bob.auth)
    new = None
    try:
        new = await Socket.open(cluster[3], bob.auth)
        assert await old.wait_closed(within=CROSS_NODE_SECONDS) == 4409
        async with client(cluster[1]) as http:
            response = await send(http, alice, bob, b"to the new socket")
            assert response.status_code == 200, response.text
        (envelope,) = await new.wait_for(1, within=CROSS_NODE_SECONDS)
        assert envelope.content == b"to the new socket"
        assert old.envelopes == []
        # The newer socket stays: nothing displaces it in return.
        await asyncio.sleep(0.5)
        assert not new.closed.is_set()
    finally:
        await old.close()
        if new is not None:
            await new.close()


async def test_a_long_poll_on_node_2_wakes_for_a_send_on_node_1(cluster: Cluster) -> None:
    alice, bob = register(cluster[1], cluster.number()), register(cluster[2], cluster.number())
    async with client(cluster[2]) as poller, client(cluster[1]) as sender:
        started = time.monotonic()
        poll = asyncio.create_task(poller.get("/v1/messages?timeout=30", headers=bob.auth))
        await asyncio.sleep(1.0)
        assert not poll.done(), "the long-poll answered before anything was sent"
        sent_at = time.monotonic()
        response = await send(sender, alice, bob, b"polled across nodes")
        assert response.status_code == 200, response.text
        answer = await asyncio.wait_for(poll, CROSS_NODE_SECONDS + 5)
        woke_after = time.monotonic() - sent_at
    assert answer.status_code == 200, answer.text
    messages = answer.json()["messages"]
    assert [m["content"] for m in messages] == [b64(b"polled across nodes")]
    assert messages[0]["sourceUuid"] == alice.aci
    assert woke_after < CROSS_NODE_SECONDS, f"woke {woke_after:.1f} s after the send (whole poll " \
                                            f"{time.monotonic() - started:.1f} s)"


async def test_a_rate_limit_exhausted_on_node_1_is_exhausted_on_node_2(cluster: Cluster) -> None:
    # prekeys: capacity 2 per (caller, target) in this cluster's configuration, permits every 600 s.
    alice, bob = register(cluster[1], cluster.number()), register(cluster[1], cluster.number())
    path = f"/v2/keys/{bob.aci}/1"
    async with client(cluster[1]) as one, client(cluster[2]) as two, client(cluster[3]) as three:
        statuses = [(await one.get(path, headers=alice.auth)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        on_two = await two.get(path, headers=alice.auth)
        assert on_two.status_code == 429, on_two.text
        assert int(on_two.headers.get("Retry-After", "0")) > 0
        assert (await three.get(path, headers=alice.auth)).status_code == 429
        # Another caller's bucket is its own.
        carol = register(cluster[3], cluster.number())
        assert (await two.get(path, headers=carol.auth)).status_code == 200


async def test_a_provisioning_message_sent_on_node_1_reaches_the_socket_on_node_2(cluster: Cluster) -> None:
    alice = register(cluster[1], cluster.number())
    envelope = b"\x0a\x21" + secrets.token_bytes(33) + b"\x12\x40" + secrets.token_bytes(64)
    socket, address = await ProvisioningSocket.open(cluster[2])
    try:
        async with client(cluster[1]) as http:
            put = asyncio.create_task(
                http.put(f"/v1/provisioning/{address}", json={"body": mime_b64(envelope)}, headers=alice.auth))
            request = await socket.next_request(within=CROSS_NODE_SECONDS)
            assert (request.verb, request.path) == ("PUT", "/v1/message")
            assert request.body == envelope
            await socket.answer(request)
            response = await asyncio.wait_for(put, 10)
            assert response.status_code == 204, response.text
            assert await socket.wait_closed() == 1000
            # Delivered once: the address went away with its socket, on every node.
            for node in (1, 2, 3):
                async with client(cluster[node]) as other:
                    again = await other.put(f"/v1/provisioning/{address}", json={"body": b64(envelope)},
                                            headers=alice.auth)
                    assert again.status_code == 404, (node, again.text)
    finally:
        await socket.close()


async def test_wait_for_linked_device_on_node_2_wakes_when_the_device_links_via_node_3(cluster: Cluster) -> None:
    alice = register(cluster[1], cluster.number())
    async with client(cluster[1]) as one, client(cluster[2]) as two, client(cluster[3]) as three:
        code = (await one.get("/v1/devices/provisioning/code", headers=alice.auth)).json()
        path = f"/v1/devices/wait_for_linked_device/{code['tokenIdentifier']}"
        wait = asyncio.create_task(two.get(f"{path}?timeout=20", headers=alice.auth))
        await asyncio.sleep(1.0)
        assert not wait.done(), "the wait answered before anything was linked"
        password = secrets.token_urlsafe(18)
        body = link_body(alice, code["verificationCode"], registration_id=2345, name=b"laptop")
        linked = await three.put("/v1/devices/link", json=body, headers=basic(alice.number, password))
        assert linked.status_code == 200, linked.text
        linked_at = time.monotonic()
        answer = await asyncio.wait_for(wait, CROSS_NODE_SECONDS + 5)
        woke_after = time.monotonic() - linked_at
        assert answer.status_code == 200, answer.text
        assert answer.json()["id"] == linked.json()["deviceId"] == 2
        assert answer.json()["registrationId"] == 2345
        assert answer.json()["name"] == b64(b"laptop")
        assert woke_after < 2.0, f"the wait ended {woke_after:.1f} s after the link"
        # The new device works on every node.
        for http in (one, two, three):
            whoami = await http.get("/v1/accounts/whoami", headers=basic(f"{alice.aci}.2", password))
            assert whoami.status_code == 200, whoami.text


async def test_removing_a_device_on_node_1_closes_its_socket_on_node_3_with_4401(cluster: Cluster) -> None:
    alice = register(cluster[1], cluster.number())
    async with client(cluster[1]) as one:
        code = (await one.get("/v1/devices/provisioning/code", headers=alice.auth)).json()["verificationCode"]
        password = secrets.token_urlsafe(18)
        linked = await one.put("/v1/devices/link", json=link_body(alice, code), headers=basic(alice.number, password))
        assert linked.status_code == 200, linked.text
        device = linked.json()["deviceId"]
        socket = await Socket.open(cluster[3], basic(f"{alice.aci}.{device}", password))
        try:
            assert (await one.delete(f"/v1/devices/{device}", headers=alice.auth)).status_code in (200, 204)
            assert await socket.wait_closed(within=CROSS_NODE_SECONDS) == 4401
        finally:
            await socket.close()


async def test_sockets_opened_at_once_on_two_nodes_leave_exactly_one(cluster: Cluster) -> None:
    alice = register(cluster[1], cluster.number())
    for _ in range(5):
        bob = register(cluster[1], cluster.number())
        sockets = await asyncio.gather(Socket.open(cluster[2], bob.auth, wait_empty=False),
                                       Socket.open(cluster[3], bob.auth, wait_empty=False))
        try:
            await asyncio.sleep(1.0)
            open_ = [s for s in sockets if s.close_code is None]
            assert len(open_) == 1, [s.close_code for s in sockets]
            assert [s.close_code for s in sockets if s not in open_] == [4409]
            async with client(cluster[1]) as http:
                assert (await send(http, alice, bob, b"to the survivor")).status_code == 200
            (envelope,) = await open_[0].wait_for(1, within=CROSS_NODE_SECONDS)
            assert envelope.content == b"to the survivor"
        finally:
            for socket in sockets:
                await socket.close()


async def test_deleting_the_account_on_node_1_closes_its_socket_on_node_2_with_4401(cluster: Cluster) -> None:
    bob = register(cluster[1], cluster.number())
    socket = await Socket.open(cluster[2], bob.auth)
    try:
        async with client(cluster[1]) as http:
            assert (await http.delete("/v1/accounts/me", headers=bob.auth)).status_code in (200, 204)
        assert await socket.wait_closed(within=CROSS_NODE_SECONDS) == 4401
        async with client(cluster[2]) as http:  # node 2's account cache was told at once
            assert (await http.get("/v1/accounts/whoami", headers=bob.auth)).status_code == 401
    finally:
        await socket.close()


def test_no_node_logged_an_error(cluster: Cluster) -> None:
    """Runs last in this module: nothing above made a node log an error or a traceback."""
    assert all(node.alive for node in cluster.nodes)
    assert cluster.log_problems() == []
