"""The Signal WebSocket at ``/v1/websocket/``: HTTP requests tunnelled over one socket.

Each binary frame is a serialized ``WebSocketMessage`` (reference §6). A REQUEST
from the client is turned into an ASGI ``http`` scope and run through the
application itself, so tunnelled requests reach exactly the same routes as plain
HTTP ones; the socket's upgrade credential is the principal, passed in
``scope["mailslot.principal"]`` (``None`` on an anonymous socket) alongside
``scope["mailslot.tunnel"] = True`` and ``scope["mailslot.session"]``. The server
can send its own REQUESTs (message delivery) with :meth:`WebSocketSession.send_request`.

The per-frame path decodes the protobuf once and builds the scope by hand; no
validation models run here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http
import logging
import random
import secrets
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import unquote

from google.protobuf.message import DecodeError
from starlette.responses import Response
from starlette.websockets import WebSocket

from mailslot.observability.logging import correlation_id, truncate_ip
from mailslot.observability.metrics import WEBSOCKETS
from mailslot.protocol.websocket_pb2 import (
    WebSocketMessage,
    WebSocketRequestMessage,
    WebSocketResponseMessage,
)

__all__ = [
    "DEFAULT_IDLE_TIMEOUT_SECONDS",
    "DEFAULT_MAX_FRAME_BYTES",
    "WEBSOCKET_PATH",
    "Authenticator",
    "Principal",
    "WebSocketClosedError",
    "WebSocketResponse",
    "WebSocketSession",
    "install_websocket",
]

log = logging.getLogger(__name__)

WEBSOCKET_PATH: Final = "/v1/websocket/"
DEFAULT_MAX_FRAME_BYTES: Final = 512 * 1024
DEFAULT_IDLE_TIMEOUT_SECONDS: Final = 90.0
DEFAULT_REQUEST_TIMEOUT_SECONDS: Final = 30.0
MAX_CONCURRENT_REQUESTS: Final = 64
"""Tunnelled requests handled at once per socket; further frames wait (backpressure)."""

CLOSE_NORMAL: Final = 1000
CLOSE_BAD_DATA: Final = 1007
CLOSE_TOO_BIG: Final = 1009
CLOSE_SERVER_ERROR: Final = 1011

_REQUEST: Final = WebSocketMessage.REQUEST
_RESPONSE: Final = WebSocketMessage.RESPONSE

# Upgrade headers that describe the socket itself, not the tunnelled requests.
# The upgrade's Authorization is dropped too: the socket's principal travels in
# the scope, and the credential should not be visible to every inner request.
_UPGRADE_ONLY: Final = frozenset({b"connection", b"upgrade", b"authorization", b"content-length"})
# Inner headers that a client may not set: the client address comes from the
# connection, the user agent from the upgrade (as in Signal-Server), and the body
# length from the frame. An inner Authorization header passes through but never
# authenticates (the API's auth dependencies read the socket's principal); the
# routes whose Basic header is not a login — `POST /v1/registration` and device
# linking carry the new device's credentials — read it, as libsignal sends them so.
_INNER_DROPPED: Final = frozenset({"x-forwarded-for", "user-agent", "content-length", "transfer-encoding"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]


class Principal(Protocol):
    """What the tunnel needs of an authenticated device (see ``mailslot.services.credentials``)."""

    @property
    def aci(self) -> uuid.UUID: ...

    @property
    def device_id(self) -> int: ...


class Authenticator(Protocol):
    """The part of ``app.state.services.authenticator`` used on upgrade."""

    async def authenticate_basic(self, header_value: str) -> Principal | None: ...

    async def authenticate_bearer(self, token: str) -> Principal | None: ...


class WebSocketClosedError(ConnectionError):
    """The socket closed before the client answered a server-initiated request."""


@dataclass(frozen=True, slots=True)
class WebSocketResponse:
    """A client's RESPONSE to a server-initiated request."""

    id: int
    status: int
    message: str
    headers: tuple[str, ...]
    body: bytes | None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def _reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _setting(app_state: Any, name: str, default: float) -> float:
    settings = getattr(app_state, "settings", None)
    ws_settings = getattr(settings, "websocket", None)
    value = getattr(ws_settings, name, None)
    return default if value is None else float(value)


class WebSocketSession:
    """One accepted socket: reads frames, runs tunnelled requests, sends server requests."""

    def __init__(
        self,
        websocket: WebSocket,
        app: ASGIApp,
        principal: Principal | None,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SECONDS,
        max_concurrent_requests: int = MAX_CONCURRENT_REQUESTS,
        fast_path: FastPath | None = None,
    ) -> None:
        self.websocket = websocket
        self.principal = principal
        self.max_frame_bytes = max_frame_bytes
        self.idle_timeout = idle_timeout
        self._app = app
        self._fast_path = fast_path
        self._scope = websocket.scope
        self._send = websocket.send
        self._slots = asyncio.Semaphore(max_concurrent_requests)
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: dict[int, asyncio.Future[WebSocketResponse]] = {}
        self._closed = asyncio.Event()
        self._closing = False
        self._reader: asyncio.Task[Any] | None = None
        self.close_code: int | None = None
        self.close_reason: str = ""
        self._last_frame = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_close: asyncio.Task[None] | None = None

        upgrade_headers: list[tuple[bytes, bytes]] = self._scope.get("headers", [])
        self._base_headers = [
            (name, value)
            for name, value in upgrade_headers
            if name not in _UPGRADE_ONLY and not name.startswith(b"sec-websocket-")
        ]
        self.upgrade_headers: dict[str, str] = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in upgrade_headers
        }
        """Upgrade request headers, names lower-cased (e.g. ``x-signal-receive-stories``)."""

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # ------------------------------------------------------------------ reading

    async def run(self) -> None:
        """Read frames until the socket closes; returns once it has."""
        self._reader = asyncio.current_task()
        try:
            await self._read_loop()
        except asyncio.CancelledError:
            # close() from another task cancels the reader; anything else is a real cancellation.
            task = asyncio.current_task()
            if not self._closing or task is None or task.uncancel() > 0:
                raise
        finally:
            # In-flight requests are left to finish (a half-done write is worse than a
            # lost reply); their responses are dropped and the client retries.
            self._reader = None
            self._mark_closed()

    def _watch_idle(self) -> None:
        """Close the socket after ``idle_timeout`` without a frame (one timer, not one per frame)."""
        if self._closed.is_set() or self._closing:
            return
        loop = asyncio.get_running_loop()
        idle_for = loop.time() - self._last_frame
        if idle_for >= self.idle_timeout:
            self._idle_close = loop.create_task(self.close(CLOSE_NORMAL, "Timeout"))
            return
        self._idle_timer = loop.call_later(self.idle_timeout - idle_for, self._watch_idle)

    async def _read_loop(self) -> None:
        receive = self.websocket.receive
        loop = asyncio.get_running_loop()
        self._last_frame = loop.time()
        self._idle_timer = loop.call_later(self.idle_timeout, self._watch_idle)
        while True:
            message = await receive()
            self._last_frame = loop.time()
            if message["type"] == "websocket.disconnect":
                self.close_code = message.get("code", CLOSE_NORMAL)
                self.close_reason = message.get("reason") or ""
                return
            data: bytes | None = message.get("bytes")
            if data is None:
                continue  # text frames are ignored
            if len(data) > self.max_frame_bytes:
                await self.close(CLOSE_TOO_BIG, "Frame too large")
                return
            try:
                frame = WebSocketMessage.FromString(data)
            except DecodeError:
                await self.close(CLOSE_BAD_DATA, "Badly formatted")
                return
            kind = frame.type
            if kind == _REQUEST and frame.HasField("request"):
                request = frame.request
                if not (request.HasField("verb") and request.HasField("path")):
                    await self.close(CLOSE_BAD_DATA, "Badly formatted")
                    return
                await self._slots.acquire()
                task = asyncio.create_task(self._handle_request(request))
                self._tasks.add(task)
                task.add_done_callback(self._request_done)
            elif kind == _RESPONSE and frame.HasField("response"):
                self._handle_response(frame.response)
            else:
                await self.close(CLOSE_BAD_DATA, "Badly formatted")
                return

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    def _handle_response(self, response: WebSocketResponseMessage) -> None:
        future = self._pending.pop(response.id, None)
        if future is None or future.done():
            return  # unknown, or already timed out
        future.set_result(
            WebSocketResponse(
                id=response.id,
                status=response.status,
                message=response.message,
                headers=tuple(response.headers),
                body=response.body if response.HasField("body") else None,
            )
        )

    # ------------------------------------------------------ tunnelled requests

    @staticmethod
    def _inner_headers(request: WebSocketRequestMessage) -> dict[bytes, bytes]:
        inner: dict[bytes, bytes] = {}
        for entry in request.headers:
            parts = entry.split(":")
            if len(parts) != 2:
                continue  # as Signal-Server: values containing ':' are dropped
            name = parts[0].strip().lower()
            if not name or name in _INNER_DROPPED:
                continue
            inner[name.encode()] = parts[1].strip().encode()
        return inner

    def request_headers(self, request: WebSocketRequestMessage) -> dict[str, str]:
        """The headers a tunnelled request is handled with (§6.3 rules), names lower-cased."""
        merged = {name.decode("latin-1"): value.decode("latin-1") for name, value in self._base_headers}
        for name, value in self._inner_headers(request).items():
            merged[name.decode("latin-1")] = value.decode("latin-1")
        return merged

    def build_scope(self, request: WebSocketRequestMessage) -> Scope:
        """The ASGI ``http`` scope for one tunnelled request (header rules of §6.3)."""
        raw_path, _, query = request.path.partition("?")
        inner = self._inner_headers(request)
        headers = [item for item in self._base_headers if item[0] not in inner]
        headers.extend(inner.items())
        if request.HasField("body"):
            headers.append((b"content-length", str(len(request.body)).encode()))
        outer = self._scope
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request.verb.upper(),
            "scheme": "https" if outer.get("scheme") == "wss" else "http",
            "path": unquote(raw_path),
            "raw_path": raw_path.encode(),
            "query_string": query.encode(),
            "root_path": outer.get("root_path", ""),
            "headers": headers,
            "client": outer.get("client"),
            "server": outer.get("server"),
            "extensions": {},
            "mailslot.tunnel": True,
            "mailslot.principal": self.principal,
            "mailslot.session": self,
        }
        if "state" in outer:
            scope["state"] = dict(outer["state"])
        return scope

    async def _handle_request(self, request: WebSocketRequestMessage) -> None:
        has_id = request.HasField("id")
        request_id = request.id
        if self._fast_path is not None:
            try:
                answer = await self._fast_path(self, request)
            except Exception:
                log.exception("tunnelled %s request failed", request.verb)
                answer = (500, [], b"")
            if answer is not None:
                if has_id:
                    fast_status, fast_headers, fast_body = answer
                    reason = "Error response" if fast_status == 500 else _reason_phrase(fast_status)
                    await self._send_response(request_id, fast_status, reason, fast_headers, fast_body)
                return
        body = request.body
        status = 0
        response_headers: list[str] = []
        chunks: list[bytes] = []
        responded = False
        body_sent = False

        async def receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await self._closed.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal status, responded
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                response_headers.extend(
                    f"{name.decode('latin-1')}:{value.decode('latin-1')}"
                    for name, value in message.get("headers", ())
                )
            elif kind == "http.response.body" and not responded:
                chunk = message.get("body", b"")
                if chunk:
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    # Answer now; background tasks of the route may still be running.
                    responded = True
                    if has_id:
                        await self._send_response(
                            request_id, status, _reason_phrase(status), response_headers, b"".join(chunks)
                        )

        try:
            await self._app(self.build_scope(request), receive, send)
        except Exception:
            log.exception("tunnelled %s request failed", request.verb)
            if not responded and has_id:
                responded = True
                await self._send_response(request_id, 500, "Error response", [], b"")
        else:
            if not responded and has_id:
                # The app returned without finishing a response.
                await self._send_response(request_id, 500, "Error response", [], b"")

    async def _send_response(
        self, request_id: int, status: int, reason: str, headers: list[str], body: bytes
    ) -> None:
        response = WebSocketResponseMessage(id=request_id, status=status, message=reason, headers=headers)
        if body:
            response.body = body
        await self.send_frame(WebSocketMessage(type=_RESPONSE, response=response).SerializeToString())

    # ------------------------------------------------- server-initiated requests

    async def send_frame(self, data: bytes) -> bool:
        """Send one binary frame; False (nothing raised) if the socket is gone."""
        if self._closed.is_set() or self._closing:
            return False
        try:
            await self._send({"type": "websocket.send", "bytes": data})
        except Exception:  # the peer went away; the reader will see the disconnect
            log.debug("websocket send failed", exc_info=True)
            self._mark_closed()
            return False
        return True

    async def start_request(
        self, verb: str, path: str, body: bytes | None, headers: list[str]
    ) -> asyncio.Future[WebSocketResponse]:
        """Send a REQUEST and return the future of its RESPONSE without waiting for it.

        Lets a sender keep many requests in flight. The future fails with
        :class:`WebSocketClosedError` if the socket closes first; the caller owns
        any timeout and should call :meth:`forget` when giving up on it.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[WebSocketResponse] = loop.create_future()
        if self.closed or self._closing:
            future.set_exception(WebSocketClosedError("socket closed"))
            return future
        request_id = random.getrandbits(63) or 1  # positive int64; not a secret
        while request_id in self._pending:
            request_id = random.getrandbits(63) or 1
        request = WebSocketRequestMessage(verb=verb, path=path, id=request_id, headers=headers)
        if body is not None:
            request.body = body
        self._pending[request_id] = future
        sent = await self.send_frame(WebSocketMessage(type=_REQUEST, request=request).SerializeToString())
        if not sent and not future.done():
            self._pending.pop(request_id, None)
            future.set_exception(WebSocketClosedError("socket closed"))
        return future

    def forget(self, future: asyncio.Future[WebSocketResponse]) -> None:
        """Stop tracking a request started with :meth:`start_request`."""
        for request_id, pending in list(self._pending.items()):
            if pending is future:
                del self._pending[request_id]
                break
        future.cancel()

    async def send_request(
        self,
        verb: str,
        path: str,
        body: bytes | None,
        headers: list[str],
        *,
        timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT_SECONDS,
    ) -> WebSocketResponse:
        """Send a REQUEST to the client and wait for its RESPONSE.

        Raises :class:`WebSocketClosedError` if the socket closes first and
        ``TimeoutError`` if no answer comes within ``timeout_seconds``.
        """
        future = await self.start_request(verb, path, body, headers)
        try:
            async with asyncio.timeout(timeout_seconds):
                return await future
        finally:
            if future.cancelled():  # timed out, or the caller was cancelled
                self.forget(future)

    # ------------------------------------------------------------------ closing

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Close the socket with ``code`` (e.g. 4401, 4409); safe to call more than once."""
        if self._closing or self._closed.is_set():
            return
        self._closing = True
        self.close_code = code
        self.close_reason = reason
        with contextlib.suppress(Exception):
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        self._mark_closed()
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()

    def _mark_closed(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(WebSocketClosedError("socket closed"))


# ----------------------------------------------------------------- the route


def _credentials(websocket: WebSocket) -> str | None:
    """The upgrade's Authorization value, or one built from legacy ``?login=&password=``."""
    header = websocket.headers.get("authorization")
    if header is not None:
        return header
    params = websocket.query_params
    login = params.get("login")
    password = params.get("password")
    if login is None and password is None:
        return None
    token = base64.b64encode(f"{login or ''}:{password or ''}".encode()).decode("ascii")
    return f"Basic {token}"


async def _authenticate(authenticator: Authenticator, credentials: str) -> Principal | None:
    scheme, _, rest = credentials.strip().partition(" ")
    if scheme.lower() == "bearer":
        return await authenticator.authenticate_bearer(rest.strip())
    return await authenticator.authenticate_basic(credentials)


async def _deny(websocket: WebSocket, status: int) -> None:
    """Refuse the upgrade with an HTTP status (403 if the server cannot send a custom one)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(Response(status_code=status))
    else:
        await websocket.close()  # uvicorn answers a close before accept with 403


SessionHook = Callable[["WebSocketSession"], Awaitable[None]]

FastResponse = tuple[int, list[str], bytes]
FastPath = Callable[["WebSocketSession", WebSocketRequestMessage], Awaitable[FastResponse | None]]
"""A handler that may answer a tunnelled request without the ASGI stack (None: not handled)."""


def install_websocket(
    app: Any,
    on_connected: SessionHook | None = None,
    on_closed: SessionHook | None = None,
    fast_path: FastPath | None = None,
) -> None:
    """Add the ``/v1/websocket/`` route (also without the trailing slash) to ``app``.

    ``app`` is the FastAPI/Starlette application; tunnelled requests are run
    through it as ASGI ``http`` requests.
    """

    async def endpoint(websocket: WebSocket) -> None:
        state = app.state
        services = getattr(state, "services", None)
        principal: Principal | None = None
        credentials = _credentials(websocket)
        if credentials is not None:
            authenticator: Authenticator | None = getattr(services, "authenticator", None)
            try:
                if authenticator is None:
                    raise RuntimeError("no authenticator configured")
                principal = await _authenticate(authenticator, credentials)
            except Exception:
                log.exception("websocket authentication failed with an error")
                await _deny(websocket, 500)
                return
            if principal is None:
                await _deny(websocket, 403)
                return

        session = WebSocketSession(
            websocket,
            app,
            principal,
            max_frame_bytes=int(_setting(state, "max_frame_bytes", DEFAULT_MAX_FRAME_BYTES)),
            idle_timeout=float(_setting(state, "idle_timeout_seconds", DEFAULT_IDLE_TIMEOUT_SECONDS)),
            fast_path=fast_path,
        )
        await websocket.accept()
        connected = False
        kind = "authenticated" if principal is not None else "anonymous"
        # One correlation id for the socket; tunnelled requests run in tasks that inherit it.
        cid_token = correlation_id.set(secrets.token_hex(8))
        client = websocket.scope.get("client")
        log.info("websocket open", extra={"kind": kind, "net": truncate_ip(client[0] if client else None)})
        WEBSOCKETS.labels(kind).inc()
        try:
            if principal is not None:
                try:
                    if on_connected is not None:
                        await on_connected(session)
                    connected = True
                except Exception:
                    log.exception("on_socket_connected failed")
                    await session.close(CLOSE_SERVER_ERROR, "Unexpected error initializing connection")
                    return
            await session.run()
        finally:
            session._mark_closed()
            if connected:
                try:
                    if on_closed is not None:
                        await on_closed(session)
                except Exception:
                    log.exception("on_socket_closed failed")
            WEBSOCKETS.labels(kind).dec()
            log.info("websocket closed", extra={"kind": kind, "code": session.close_code})
            correlation_id.reset(cid_token)

    app.router.add_websocket_route(WEBSOCKET_PATH, endpoint)
    app.router.add_websocket_route(WEBSOCKET_PATH.rstrip("/"), endpoint)
