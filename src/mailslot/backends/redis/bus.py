"""The cluster bus: Redis pub/sub with reference-counted subscriptions and pipelined publishing.

One subscriber connection per node carries every channel the node listens on; one client connection
publishes. Losing Redis does not stop the node: publishes are dropped (the messages themselves are in
the database), subscriptions are restored when Redis is back, and ``on_reconnect`` callbacks let the
owners make up for wake-ups that were lost meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

log = logging.getLogger("mailslot.cluster")

Handler = Callable[[bytes], None]

SUBSCRIBE_WAIT_SECONDS = 2.0
RETRY_SECONDS = (0.1, 0.25, 0.5, 1.0, 2.0)
PUBLISH_BATCH = 512
PING_SECONDS = 5.0
ALIVE = "mailslot-alive"


class RedisBus:
    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.healthy = False
        self.on_reconnect: list[Callable[[], None]] = []
        self._handlers: dict[str, dict[int, Handler]] = {}
        self._next_handle = 0
        self._confirmed: set[str] = set()
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._control: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._outbox: list[tuple[str, bytes]] = []
        self._outbox_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: aioredis.client.PubSub | None = None
        self._closing = False

    def channel(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._subscriber(), name="mailslot-bus-subscriber"),
            asyncio.create_task(self._publisher(), name="mailslot-bus-publisher"),
        ]

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.client.aclose()

    async def ping(self) -> None:
        """Raises when Redis cannot be reached or the subscriber connection is down."""
        async with asyncio.timeout(1.0):
            await self.client.ping()  # type: ignore[misc]
        if not self.healthy:
            raise ConnectionError("the Redis subscriber connection is being restored")

    # -- subscriptions ----------------------------------------------------------------------------

    def subscribe(self, channel: str, handler: Handler) -> int:
        """Listen on ``channel``; returns a handle for :meth:`unsubscribe`. The first listener of a
        channel subscribes in Redis; :meth:`ready` waits until Redis has confirmed it."""
        self._next_handle += 1
        handlers = self._handlers.setdefault(channel, {})
        if not handlers:
            self._control.put_nowait(("subscribe", channel))
        handlers[self._next_handle] = handler
        return self._next_handle

    def unsubscribe(self, channel: str, handle: int) -> None:
        handlers = self._handlers.get(channel)
        if handlers is None or handlers.pop(handle, None) is None:
            return
        if not handlers:
            del self._handlers[channel]
            self._confirmed.discard(channel)
            self._control.put_nowait(("unsubscribe", channel))

    async def ready(self, channel: str) -> None:
        """Wait (briefly) until a subscription is live, so that nothing published after this is missed.

        While Redis is away this returns after a short wait: the caller goes on and relies on the
        queue being read again when Redis is back.
        """
        if channel in self._confirmed or channel not in self._handlers:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(channel, []).append(future)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SUBSCRIBE_WAIT_SECONDS):
                await future

    def _confirm(self, channel: str) -> None:
        if channel in self._handlers:
            self._confirmed.add(channel)
        for future in self._waiting.pop(channel, []):
            if not future.done():
                future.set_result(None)

    async def _subscriber(self) -> None:
        attempt = 0
        while not self._closing:
            pubsub = self.client.pubsub()
            self._pubsub = pubsub
            control: asyncio.Task[None] | None = None
            try:
                # The connection is made by the first command; subscribe to what is wanted now.
                await pubsub.ping()
                self._drain_control()
                channels = list(self._handlers)
                if channels:
                    await pubsub.subscribe(*channels)
                was_down = not self.healthy and attempt > 0
                self.healthy = True
                attempt = 0
                if was_down:
                    log.warning("Redis is reachable again; resubscribed")
                    for callback in self.on_reconnect:
                        callback()
                control = asyncio.create_task(self._send_control(pubsub))
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self.healthy or attempt == 0:
                    log.warning("Redis subscriber connection lost: %s", type(exc).__name__)
                self.healthy = False
            finally:
                if control is not None:
                    control.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await control
                self._confirmed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)])
            attempt += 1

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        """Read messages; a ping of our own every few seconds proves the connection is alive (a
        half-open TCP connection would otherwise look like a quiet one for hours)."""
        loop = asyncio.get_running_loop()
        last_pong = next_ping = loop.time()
        while True:
            now = loop.time()
            if now >= next_ping:
                await pubsub.ping(ALIVE)
                next_ping = now + PING_SECONDS
            if now - last_pong > 3 * PING_SECONDS:
                raise ConnectionError("no answer from Redis on the subscriber connection")
            message = await pubsub.get_message(timeout=PING_SECONDS)
            if message is None:
                continue
            if message.get("type") == "pong":
                last_pong = loop.time()
                continue
            self._dispatch(message)

    def _drain_control(self) -> None:
        """Pending (un)subscribe requests are covered by the full resubscription that follows."""
        while not self._control.empty():
            self._control.get_nowait()

    async def _send_control(self, pubsub: aioredis.client.PubSub) -> None:
        """(Un)subscribe requests, in order, batched; a lost connection is noticed by the reader."""
        while True:
            first = await self._control.get()
            batch = [first]
            while not self._control.empty():
                batch.append(self._control.get_nowait())
            # Only the last request for a channel matters.
            final: dict[str, str] = {}
            for action, channel in batch:
                final[channel] = action
            wanted = [c for c, a in final.items() if a == "subscribe" and c in self._handlers]
            gone = [c for c, a in final.items() if a == "unsubscribe" and c not in self._handlers]
            if wanted:
                await pubsub.subscribe(*wanted)
            if gone:
                await pubsub.unsubscribe(*gone)

    def _dispatch(self, message: dict[str, object]) -> None:
        kind = message.get("type")
        raw_channel = message.get("channel")
        channel = raw_channel.decode() if isinstance(raw_channel, bytes) else str(raw_channel)
        if kind == "subscribe":
            self._confirm(channel)
            return
        if kind != "message":
            return
        data = message.get("data")
        if not isinstance(data, bytes):
            return
        for handler in list(self._handlers.get(channel, {}).values()):
            try:
                handler(data)
            except Exception:
                log.exception("bus handler failed")

    # -- publishing -------------------------------------------------------------------------------

    def publish_later(self, channel: str, data: bytes) -> None:
        """Queue a publish; the publisher task sends queued ones together in one pipeline."""
        self._outbox.append((channel, data))
        self._outbox_ready.set()

    async def publish(self, channel: str, data: bytes) -> int:
        """Publish now; returns how many subscribers (over the whole cluster) received it."""
        async with asyncio.timeout(5.0):
            return int(await self.client.publish(channel, data))

    async def _publisher(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                batch, self._outbox = self._outbox[:PUBLISH_BATCH], self._outbox[PUBLISH_BATCH:]
                try:
                    async with asyncio.timeout(5.0), self.client.pipeline(transaction=False) as pipe:
                        for channel, data in batch:
                            pipe.publish(channel, data)
                        await pipe.execute()
                except (RedisError, OSError, TimeoutError) as exc:
                    # The messages are stored; whoever missed the wake-up reads its queue after the
                    # reconnect (or the sweep). Drop what is queued rather than grow without bound.
                    log.warning("Redis publish failed (%s); %d wake-ups dropped", type(exc).__name__,
                                len(batch) + len(self._outbox))
                    self._outbox.clear()


def client_for(url: str) -> aioredis.Redis:
    # No silent retries inside redis-py: a lost connection must surface here, so that the bus knows
    # to resubscribe and to tell its owners to read their queues again.
    return aioredis.Redis.from_url(
        url, socket_connect_timeout=2.0, socket_keepalive=True, health_check_interval=10,
        retry=Retry(NoBackoff(), 0),
    )


async def connect(url: str, prefix: str) -> RedisBus:
    bus = RedisBus(client_for(url), prefix)
    await bus.start()
    return bus
