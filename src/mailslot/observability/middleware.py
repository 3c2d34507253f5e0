"""ASGI middleware: correlation ids, access log lines, request metrics, body size cap and HSTS."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailslot.observability.logging import correlation_id, truncate_ip
from mailslot.observability.metrics import HTTP_LATENCY, HTTP_REQUESTS

access_log = logging.getLogger("mailslot.access")


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, hsts_max_age: int | None, access_log_on: bool,
                 streamed: Callable[[Scope], bool] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.hsts = f"max-age={hsts_max_age}; includeSubDomains".encode() if hsts_max_age else None
        self.access_log_on = access_log_on
        # Routes that stream their bodies and enforce their own limits (tus uploads, avatar forms).
        self.streamed = streamed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tunnelled = bool(scope.get("mailslot.tunnel"))
        token = None
        if not tunnelled:
            token = correlation_id.set(secrets.token_hex(8))
        started = time.perf_counter()
        status_holder = [500]
        declared = _content_length(scope)
        cap = None if self.streamed is not None and self.streamed(scope) else self.max_body_bytes
        if cap is not None and declared is not None and declared > cap:
            await _too_large(send)
            status_holder[0] = 413
            self._record(scope, 413, started, tunnelled)
            if token is not None:
                correlation_id.reset(token)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if cap is not None and received > cap:
                    raise _BodyTooLarge
            return message

        response_started = [False]

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_started[0] = True
                status_holder[0] = message["status"]
                if self.hsts is not None and not tunnelled:
                    message["headers"] = [*message.get("headers", []), (b"strict-transport-security", self.hsts)]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-signal-timestamp", str(int(time.time() * 1000)).encode()),
                ]
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if response_started[0]:
                raise
            status_holder[0] = 413
            await _too_large(send)
        finally:
            self._record(scope, status_holder[0], started, tunnelled)
            if token is not None:
                correlation_id.reset(token)

    def _record(self, scope: Scope, status: int, started: float, tunnelled: bool) -> None:
        route = _route_template(scope)
        elapsed = time.perf_counter() - started
        transport = "websocket" if tunnelled else "http"
        HTTP_REQUESTS.labels(route, scope["method"], str(status), transport).inc()
        HTTP_LATENCY.labels(route).observe(elapsed)
        # Tunnelled requests (one per message on a busy socket) are logged only when they fail.
        if self.access_log_on and (not tunnelled or status >= 400):
            client = scope.get("client")
            access_log.info(
                "request",
                extra={
                    "method": scope["method"], "route": route, "status": status, "transport": transport,
                    "ms": round(elapsed * 1000, 2), "net": truncate_ip(client[0] if client else None),
                },
            )


class _BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body without (or beyond) its Content-Length outgrows the cap.

    It is an ``HTTPException`` so that a framework reading the body inside its own error handling
    (FastAPI turns any other exception there into a 400) still answers 413.
    """

    def __init__(self) -> None:
        super().__init__(413, "request body is too large")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _route_template(scope: Scope) -> str:
    """The matched route's template (``/v1/verification/session/{session_id}``), never the raw path:
    raw paths can hold identifiers that do not belong in logs or metric labels."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


async def _too_large(send: Send) -> None:
    body = json.dumps({"code": "payload_too_large", "message": "request body is too large"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
