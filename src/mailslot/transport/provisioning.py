"""The provisioning socket (digest §3.2): a new device waits here for its primary's ProvisionEnvelope.

On connect the server sends ``PUT /v1/address`` with a ``ProvisioningAddress`` (field 1: the address,
URL-safe base64 of 16 random bytes). A ``PUT /v1/provisioning/{address}`` from the primary is delivered
as ``PUT /v1/message`` with the envelope bytes; the socket then closes. It closes after 90 s regardless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from starlette.websockets import WebSocket

from mailslot.transport.websocket import WebSocketClosedError, WebSocketSession

log = logging.getLogger("mailslot.provisioning")

PROVISIONING_PATH = "/v1/websocket/provisioning/"
LIFETIME_SECONDS = 90.0
IDLE_SECONDS = 60.0


def provisioning_address_message(address: str) -> bytes:
    data = address.encode()
    return b"\x0a" + bytes([len(data)]) + data  # field 1, length-delimited; addresses are < 128 bytes


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a socket closed before answering is not an error here


def install_provisioning(app: Any) -> None:
    async def endpoint(websocket: WebSocket) -> None:
        services = app.state.services
        await websocket.accept()
        session = WebSocketSession(websocket, app, None, idle_timeout=IDLE_SECONDS)
        delivered = asyncio.Event()

        async def deliver(envelope: bytes) -> bool:
            try:
                response = await session.send_request(
                    "PUT", "/v1/message", envelope, [f"X-Signal-Timestamp:{int(time.time() * 1000)}"]
                )
            except (WebSocketClosedError, TimeoutError):
                return False
            delivered.set()
            return response.ok

        address = services.provisioning.new_address(deliver)
        await services.provisioning.settle(address)

        async def lifecycle() -> None:
            # The lifetime counts from the connection, and the address request's answer is not awaited:
            # a client that never answers it must not hold the socket open past the lifetime.
            try:
                async with asyncio.timeout(LIFETIME_SECONDS):
                    announced = await session.start_request(
                        "PUT",
                        "/v1/address",
                        provisioning_address_message(address),
                        [f"X-Signal-Timestamp:{int(time.time() * 1000)}"],
                    )
                    announced.add_done_callback(_ignore_outcome)
                    await delivered.wait()
            except TimeoutError:
                await session.close(1000, "Timeout")
                return
            await session.close(1000, "Closed")

        task = asyncio.create_task(lifecycle())
        try:
            await session.run()
        finally:
            services.provisioning.release(address)
            session._mark_closed()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketClosedError, TimeoutError):
                await task

    app.router.add_websocket_route(PROVISIONING_PATH, endpoint)
    app.router.add_websocket_route(PROVISIONING_PATH.rstrip("/"), endpoint)
