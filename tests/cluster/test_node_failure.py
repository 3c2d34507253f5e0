"""SIGKILL of the node that holds a receiver's socket while senders on the other nodes keep sending: the
receiver reconnects to a surviving node and gets every message whose sender got 200, in each sender's
order; a message comes twice only if the receiver had not acknowledged it (or acknowledged it on the
killed node just before the kill, so that the acknowledgement may have died with the node).

``MAILSLOT_FAILURE_RUNS=10`` runs the scenario ten times (a fresh three-node cluster each time):

    MAILSLOT_FAILURE_RUNS=10 .venv/bin/python -m pytest tests/cluster/test_node_failure.py -s
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster.cluster_support import Cluster, Node, Socket, register, running_cluster, send
from tests.helpers import TestAccount

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

RUNS = int(os.environ.get("MAILSLOT_FAILURE_RUNS", "1"))
SENDERS = 4
DELIVERED_BEFORE_KILL = 60  # the kill comes mid-stream, after this many arrivals on the doomed node
SEND_AFTER_RECONNECT = 1.5  # seconds the senders go on after the receiver is back
ACK_GRACE = 1.0  # an ack sent this close before the kill may have died with the node (not yet committed)
DRAIN_SECONDS = 20.0


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[Cluster]:
    # The sweep (300 s) cannot deliver anything during the run: after the reconnect, only the queue read
    # on connect and the Redis wake-ups do.
    with running_cluster(tmp_path / "cluster", nodes=3, sweep_seconds=300) as cluster:
        yield cluster


class Sender:
    def __init__(self, index: int, account: TestAccount, node: Node, to: TestAccount) -> None:
        self.index, self.account, self.node, self.to = index, account, node, to
        self.acknowledged: list[int] = []  # sequence numbers answered 200, in order
        self.failures: list[str] = []
        self.attempted = 0

    def content(self, seq: int) -> bytes:
        return f"{self.index} {seq}".encode()

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=self.node.http, timeout=15, trust_env=False) as http:
            seq = 0
            while not stop.is_set():
                self.attempted += 1
                try:
                    response = await send(http, self.account, self.to, self.content(seq), timestamp=seq + 1)
                except httpx.HTTPError as exc:  # the senders' nodes stay up: this should not happen
                    self.failures.append(f"seq {seq}: {exc!r}")
                else:
                    if response.status_code == 200:
                        self.acknowledged.append(seq)
                    else:
                        self.failures.append(f"seq {seq}: {response.status_code} {response.text[:200]}")
                seq += 1


@pytest.mark.parametrize("run", range(RUNS))
async def test_sigkill_of_the_receivers_node_loses_no_acknowledged_message(fresh_cluster: Cluster, run: int) -> None:
    cluster = fresh_cluster
    doomed, survivors = cluster[2], [cluster[1], cluster[3]]
    bob = register(cluster[1], cluster.number())
    senders = [Sender(i, register(survivors[i % 2], cluster.number()), survivors[i % 2], bob) for i in range(SENDERS)]
    reconnect_to = survivors[run % 2]

    first = await Socket.open(doomed, bob.auth)
    second: Socket | None = None
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in senders]
    try:
        async with asyncio.timeout(20):
            await first.wait_for(DELIVERED_BEFORE_KILL, within=20)
        killed_at = time.monotonic()
        assert doomed.proc is not None
        doomed.proc.kill()  # SIGKILL, mid-stream
        await asyncio.to_thread(doomed.proc.wait, 10)
        assert await first.wait_closed(within=10) == 1006  # no close frame: the process is gone
        second = await Socket.open(reconnect_to, bob.auth, wait_empty=False)
        reconnected_at = time.monotonic()
        await asyncio.sleep(SEND_AFTER_RECONNECT)
        stop.set()
        await asyncio.gather(*tasks)
        stopped_at = time.monotonic()

        expected = {s.content(seq) for s in senders for seq in s.acknowledged}
        deadline = time.monotonic() + DRAIN_SECONDS
        def arrived() -> set[bytes]:
            return {e.content for e in first.envelopes + second.envelopes}

        while time.monotonic() < deadline and not expected <= arrived():  # noqa: ASYNC110 - two sockets
            await asyncio.sleep(0.05)
        drained_at = time.monotonic()
        await asyncio.sleep(0.3)  # late duplicates
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await first.close()
        if second is not None:
            await second.close()
    assert second is not None

    report = check(senders, first, second, killed_at)
    report.update(run=run, reconnected_to=reconnect_to.index, reconnect_seconds=round(reconnected_at - killed_at, 3),
                  drain_seconds=round(drained_at - stopped_at, 3))
    print("node-failure run:", json.dumps(report))
    assert report["failed_sends"] == [], report
    assert report["lost"] == 0, report
    assert report["order_violations"] == 0, report
    assert report["duplicates_of_acknowledged"] == 0, report
    assert report["unknown"] == 0, report
    await assert_queue_empty(reconnect_to, bob)
    problems = [p for node in survivors for p in node.log_problems()]
    assert problems == [], problems


def check(senders: list[Sender], first: Socket, second: Socket, killed_at: float) -> dict[str, Any]:
    by_content = {s.content(seq): (s, seq) for s in senders for seq in range(s.attempted)}
    acknowledged = {s.content(seq) for s in senders for seq in s.acknowledged}
    arrivals = [*first.arrivals, *second.arrivals]  # every arrival on the first socket precedes the second's
    seen: dict[bytes, Any] = {}
    last_seq: dict[int, int] = {}
    duplicates, duplicates_of_acknowledged, duplicates_in_grace, order_violations, unknown = 0, 0, 0, 0, 0
    examples: list[str] = []
    grace_ages: list[float] = []  # how long before the kill a duplicated message had been acknowledged
    for arrival in arrivals:
        content = arrival.envelope.content
        if content not in by_content:
            unknown += 1
            continue
        sender, seq = by_content[content]
        earlier = seen.get(content)
        if earlier is not None:
            duplicates += 1
            if earlier.acknowledged_at is not None:
                on_doomed = earlier in first.arrivals
                if on_doomed and earlier.acknowledged_at > killed_at - ACK_GRACE:
                    duplicates_in_grace += 1
                    grace_ages.append(killed_at - earlier.acknowledged_at)
                else:
                    duplicates_of_acknowledged += 1
                    examples.append(f"duplicate of acknowledged {content!r}")
            continue
        seen[content] = arrival
        if seq < last_seq.get(sender.index, -1):
            order_violations += 1
            examples.append(f"{content!r} after {sender.content(last_seq[sender.index])!r}")
        last_seq[sender.index] = max(seq, last_seq.get(sender.index, -1))
    lost = sorted(acknowledged - set(seen), key=lambda c: (by_content[c][0].index, by_content[c][1]))
    return {
        "sent": sum(s.attempted for s in senders),
        "acknowledged": len(acknowledged),
        "delivered_on_killed_node": len(first.arrivals),
        "acknowledged_by_receiver_on_killed_node": sum(1 for a in first.arrivals if a.acknowledged_at is not None),
        "delivered_after_reconnect": len(second.arrivals),
        "delivered_without_200": len(set(seen) - acknowledged),
        "lost": len(lost),
        "lost_sample": [c.decode() for c in lost[:10]],
        "duplicates": duplicates,
        "duplicates_of_unacknowledged_or_just_acknowledged": duplicates - duplicates_of_acknowledged,
        "duplicates_acknowledged_within_grace": duplicates_in_grace,
        "duplicated_ack_sent_before_kill_ms_max": round(1000 * max(grace_ages), 1) if grace_ages else None,
        "duplicates_of_acknowledged": duplicates_of_acknowledged,
        "order_violations": order_violations,
        "unknown": unknown,
        "examples": examples[:10],
        "failed_sends": [f for s in senders for f in s.failures][:10],
    }


async def assert_queue_empty(node: Node, account: TestAccount) -> None:
    """The receiver's acknowledgements on the new node were committed: nothing is left queued."""
    async with httpx.AsyncClient(base_url=node.http, timeout=10, trust_env=False) as http:
        for _ in range(100):
            left = (await http.get("/v1/messages", headers=account.auth)).json()["messages"]
            if not left:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{len(left)} acknowledged messages are still queued")
