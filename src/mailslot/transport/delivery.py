"""The sender loop of one authenticated socket (digest §6.4).

On connect: take the device's presence (displacing an older socket with 4409), stream the queue in
order with a bounded number of deliveries in flight, then send ``PUT /api/v1/queue/empty`` once. New
messages arrive in memory from the send path; the queue is read again only when that hand-over
overflowed. A 2xx answer deletes the envelope (and queues the sender's receipt); anything else leaves it
queued for the next connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from mailslot.services.delivery import DeliveryService
from mailslot.services.presence import Outgoing
from mailslot.transport.websocket import WebSocketClosedError, WebSocketResponse, WebSocketSession

log = logging.getLogger("mailslot.delivery")

MESSAGE_PATH = "/api/v1/message"
QUEUE_EMPTY_PATH = "/api/v1/queue/empty"
ACK_TIMEOUT_SECONDS = 60.0
MAX_HANDOVER = 1024  # messages kept in memory for a device before falling back to reading the queue
RECENT_DONE = 4096


class SocketDelivery:
    def __init__(self, session: WebSocketSession, delivery: DeliveryService, max_in_flight: int) -> None:
        principal = session.principal
        assert principal is not None
        self.session = session
        self.delivery = delivery
        self.key = (principal.aci, principal.device_id)
        self.receive_stories = session.upgrade_headers.get("x-signal-receive-stories", "").lower() == "true"
        self._slots = asyncio.Semaphore(max_in_flight)
        self._handover: deque[Outgoing] = deque()
        self._read_queue = True  # the backlog is read first
        self._wake = asyncio.Event()
        self._wake.set()
        # Ids sent on this socket and not yet settled (acked and deleted, or refused).
        self._in_flight: set[int] = set()
        # Ids the client refused: they stay queued but are not sent again on this socket.
        self._refused: set[int] = set()
        # GUIDs acknowledged lately: a message handed over in memory after it was already read from the
        # queue and acknowledged is not sent twice.
        self._recent: OrderedDict[uuid.UUID, None] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._expirer: asyncio.Task[None] | None = None
        self._stopping = False
        self._deadlines: dict[int, tuple[float, asyncio.Future[WebSocketResponse]]] = {}
        self._answered_ok: list[Outgoing] = []
        self._acks_ready = asyncio.Event()

    # -- DeviceListener -------------------------------------------------------------------------

    def notify(self, messages: Sequence[Outgoing] | None) -> None:
        if messages is None or len(self._handover) + len(messages) > MAX_HANDOVER:
            self._handover.clear()
            self._read_queue = True
        else:
            self._handover.extend(messages)
        self._wake.set()

    async def displace(self, code: int, reason: str) -> None:
        await self.session.close(code, reason)

    # -- the loop -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mailslot-sender-loop")
        self._flusher = asyncio.create_task(self._flush_acks())
        self._expirer = asyncio.create_task(self._expire_answers())

    async def stop(self) -> None:
        for task in (self._task, self._expirer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # Acknowledgements that arrived before the close are still settled: none is lost. The flusher is
        # not cancelled (a batch cut off between taking and committing would be redelivered, and its
        # receipts never sent): it finishes what it holds, settles the rest, and returns.
        self._stopping = True
        self._acks_ready.set()
        if self._flusher is not None:
            await self._flusher

    async def _run(self) -> None:
        first = True
        try:
            while not self.session.closed:
                await self._wake.wait()
                self._wake.clear()
                if self._read_queue:
                    self._read_queue = False
                    await self._drain_queue()
                    if first:
                        first = False
                        future = await self.session.start_request("PUT", QUEUE_EMPTY_PATH, None, [_timestamp_header()])
                        future.add_done_callback(_ignore_outcome)
                # If the hand-over overflowed meanwhile, the messages it dropped are older than what it
                # holds now: read the queue first, or a newer message would overtake them.
                while self._handover and not self._read_queue:
                    message = self._handover.popleft()
                    if message.id in self._in_flight or message.guid in self._recent or message.id in self._refused:
                        continue
                    await self._deliver(message)
        except (WebSocketClosedError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("sender loop failed")
            await self.session.close(1011, "Failed to retrieve messages")

    async def _drain_queue(self) -> None:
        while not self.session.closed:
            exclude = self._in_flight | self._refused
            batch = await self.delivery.fetch(self.key[0], self.key[1], exclude, limit=100)
            if not batch:
                return
            for message in batch:
                await self._deliver(message)

    async def _deliver(self, message: Outgoing) -> None:
        if message.story and not self.receive_stories:
            # Stories go only to sockets that asked for them; for the others they are dropped (§6.4).
            self._in_flight.add(message.id)
            self._answered_ok.append(message)
            self._acks_ready.set()
            return
        await self._slots.acquire()
        self._in_flight.add(message.id)
        try:
            future = await self.session.start_request("PUT", MESSAGE_PATH, message.envelope, [_timestamp_header()])
        except Exception:
            self._in_flight.discard(message.id)
            self._slots.release()
            raise
        self._deadlines[message.id] = (time.monotonic() + ACK_TIMEOUT_SECONDS, future)
        future.add_done_callback(functools.partial(self._answered, message))

    def _answered(self, message: Outgoing, future: asyncio.Future[WebSocketResponse]) -> None:
        """The client's answer (or the socket's end): called once per delivery, without a task of its own."""
        self._slots.release()
        self._deadlines.pop(message.id, None)
        ok = not future.cancelled() and future.exception() is None and future.result().ok
        if ok:
            self._answered_ok.append(message)
            self._acks_ready.set()
        else:
            self._in_flight.discard(message.id)
            self._refused.add(message.id)

    async def _flush_acks(self) -> None:
        """Acknowledgements that arrived together are settled together (one group-commit submission)."""
        while True:
            await self._acks_ready.wait()
            self._acks_ready.clear()
            batch, self._answered_ok = self._answered_ok, []
            if batch:
                await self._settle(batch)
            if self._stopping and not self._answered_ok:
                return

    async def _settle(self, batch: list[Outgoing]) -> None:
        try:
            await self.delivery.acknowledge_many(self.key[0], self.key[1], batch)
        except Exception:
            log.exception("acknowledgement failed; the messages stay queued")
            for message in batch:
                self._in_flight.discard(message.id)
                self._refused.add(message.id)
            return
        for message in batch:
            self._in_flight.discard(message.id)
            self._recent[message.guid] = None
        while len(self._recent) > RECENT_DONE:
            self._recent.popitem(last=False)

    async def _expire_answers(self) -> None:
        """A delivery without an answer for ACK_TIMEOUT_SECONDS counts as refused (it stays queued)."""
        while True:
            await asyncio.sleep(ACK_TIMEOUT_SECONDS / 4)
            now = time.monotonic()
            for _, (deadline, future) in list(self._deadlines.items()):
                if deadline <= now:
                    self.session.forget(future)  # cancels it: _answered sees a refusal


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    """The client's answer to queue-empty does not matter; take it (or the close) so none is left unread."""
    if not future.cancelled():
        future.exception()


def _timestamp_header() -> str:
    return f"X-Signal-Timestamp:{int(time.time() * 1000)}"


class DeliveryHooks:
    """Connect and close hooks for the WebSocket route: presence, displacement and the sender loop."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._loops: dict[int, SocketDelivery] = {}

    async def connected(self, session: WebSocketSession) -> None:
        if session.upgrade_headers.get("x-signal-disable-messages", "").lower() == "true":
            return
        services = self.app.state.services
        delivery: DeliveryService = services.delivery
        loop = SocketDelivery(session, delivery, services.settings.delivery.max_in_flight)
        previous = delivery.presence.register(loop.key, loop)
        if previous is not None:
            await previous.displace(4409, "Connected elsewhere")
        self._loops[id(session)] = loop
        # In a cluster: once wake-ups from other nodes reach us (and older sockets elsewhere were told
        # to go), the backlog read that starts the loop cannot miss a message.
        await delivery.presence.settle(loop.key)
        loop.start()

    async def closed(self, session: WebSocketSession) -> None:
        loop = self._loops.pop(id(session), None)
        if loop is None:
            return
        self.app.state.services.delivery.presence.unregister(loop.key, loop)
        await loop.stop()
