"""The /v1/websocket/ tunnel: upgrade auth, framing, header rules, server-initiated requests."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import uuid
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
import websockets
from fastapi import FastAPI, Request, Response
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from mailslot.protocol.websocket_pb2 import (
    WebSocketMessage,
    WebSocketRequestMessage,
    WebSocketResponseMessage,
)
from mailslot.transport.websocket import (
    WebSocketClosedError,
    WebSocketResponse,
    WebSocketSession,
    install_websocket,
)

ACI = uuid.UUID("8c78cd2a-16ff-427d-83dc-1a5e36ce713d")
PASSWORD = "correct-password"
TOKEN = "good-token"


@dataclass
class FakePrincipal:
    aci: uuid.UUID
    device_id: int


class FakeAuthenticator:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def authenticate_basic(self, header_value: str) -> FakePrincipal | None:
        self.calls.append(header_value)
        scheme, _, encoded = header_value.partition(" ")
        if scheme.lower() != "basic":
            return None
        user, _, password = base64.b64decode(encoded).decode().partition(":")
        aci_text, _, device = user.partition(".")
        if aci_text != str(ACI) or password != PASSWORD:
            return None
        return FakePrincipal(ACI, int(device or 1))

    async def authenticate_bearer(self, token: str) -> FakePrincipal | None:
        self.calls.append(f"bearer {token}")
        return FakePrincipal(ACI, 3) if token == TOKEN else None


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def make_app(hooks: dict[str, Any] | None = None, **ws_settings: Any) -> FastAPI:
    hooks = hooks or {}
    app = FastAPI()
    app.state.services = SimpleNamespace(authenticator=FakeAuthenticator())
    if ws_settings:
        app.state.settings = SimpleNamespace(websocket=SimpleNamespace(**ws_settings))
    recorded: list[str] = []
    gate = asyncio.Event()
    app.state.recorded = recorded

    @app.get("/v1/whoami")
    async def whoami(request: Request) -> dict[str, Any]:
        principal = request.scope.get("mailslot.principal")
        return {
            "tunnel": request.scope.get("mailslot.tunnel", False),
            "aci": str(principal.aci) if principal else None,
            "device": principal.device_id if principal else None,
            "session": isinstance(request.scope.get("mailslot.session"), WebSocketSession),
        }

    @app.get("/v1/headers")
    async def headers(request: Request) -> dict[str, Any]:
        return {
            "headers": [[k, v] for k, v in request.headers.items()],
            "query": dict(request.query_params),
            "path": request.url.path,
            "client": request.client.host if request.client else None,
        }

    @app.put("/v1/echo/{name}")
    async def echo(name: str, request: Request) -> Response:
        body = await request.body()
        return Response(
            content=body,
            status_code=201,
            media_type=request.headers.get("content-type", "application/octet-stream"),
            headers={"X-Echo-Name": name},
        )

    @app.put("/v1/record/{item}")
    async def record(item: str) -> Response:
        recorded.append(item)
        return Response(status_code=204)

    @app.get("/v1/wait")
    async def wait() -> dict[str, str]:
        await asyncio.wait_for(gate.wait(), 5)
        return {"waited": "yes"}

    @app.get("/v1/release")
    async def release() -> dict[str, str]:
        gate.set()
        return {"released": "yes"}

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    install_websocket(app, on_connected=hooks.get("connected"), on_closed=hooks.get("closed"))
    return app


def request_frame(
    verb: str,
    path: str,
    request_id: int | None = None,
    headers: list[str] | None = None,
    body: bytes | None = None,
) -> bytes:
    request = WebSocketRequestMessage(verb=verb, path=path, headers=headers or [])
    if request_id is not None:
        request.id = request_id
    if body is not None:
        request.body = body
    return WebSocketMessage(type=WebSocketMessage.REQUEST, request=request).SerializeToString()


def read_response(ws: Any) -> WebSocketResponseMessage:
    frame = WebSocketMessage.FromString(ws.receive_bytes())
    assert frame.type == WebSocketMessage.RESPONSE
    return frame.response


def response_headers(response: WebSocketResponseMessage) -> dict[str, str]:
    return dict(h.split(":", 1) for h in response.headers)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(make_app()) as test_client:
        yield test_client


# ------------------------------------------------------------------ tunnelling


def test_anonymous_tunnel_request(client: TestClient) -> None:
    with client.websocket_connect("/v1/websocket/") as ws:
        ws.send_bytes(request_frame("GET", "/v1/whoami", 1))
        response = read_response(ws)
    assert response.id == 1
    assert response.status == 200
    assert response.message == "OK"
    assert response_headers(response)["content-type"] == "application/json"
    assert json.loads(response.body) == {"tunnel": True, "aci": None, "device": None, "session": True}


def test_path_without_trailing_slash(client: TestClient) -> None:
    with client.websocket_connect("/v1/websocket") as ws:
        ws.send_bytes(request_frame("GET", "/v1/whoami", 9))
        assert read_response(ws).status == 200


def test_body_status_and_headers_round_trip(client: TestClient) -> None:
    with client.websocket_connect("/v1/websocket/") as ws:
        ws.send_bytes(request_frame("PUT", "/v1/echo/abc", 77, ["content-type:application/json"], b'{"x":1}'))
        response = read_response(ws)
    assert (response.id, response.status, response.message) == (77, 201, "Created")
    assert response.body == b'{"x":1}'
    headers = response_headers(response)
    assert headers["x-echo-name"] == "abc"
    assert headers["content-length"] == "7"
    assert headers["content-type"] == "application/json"


def test_unknown_route_is_404(client: TestClient) -> None:
    with client.websocket_connect("/v1/websocket/") as ws:
        ws.send_bytes(request_frame("GET", "/v1/nothing-here", 5))
        response = read_response(ws)
    assert (response.status, response.message) == (404, "Not Found")


def test_basic_auth_principal_visible_in_scope(client: TestClient) -> None:
    headers = {"Authorization": basic(f"{ACI}.2", PASSWORD)}
    with client.websocket_connect("/v1/websocket/", headers=headers) as ws:
        ws.send_bytes(request_frame("GET", "/v1/whoami", 1))
        body = json.loads(read_response(ws).body)
    assert body == {"tunnel": True, "aci": str(ACI), "device": 2, "session": True}


def test_legacy_query_credentials(client: TestClient) -> None:
    with client.websocket_connect(f"/v1/websocket/?login={ACI}.4&password={PASSWORD}") as ws:
        ws.send_bytes(request_frame("GET", "/v1/whoami", 1))
        body = json.loads(read_response(ws).body)
    assert (body["aci"], body["device"]) == (str(ACI), 4)


def test_bearer_token(client: TestClient) -> None:
    with client.websocket_connect("/v1/websocket/", headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        ws.send_bytes(request_frame("GET", "/v1/whoami", 1))
        body = json.loads(read_response(ws).body)
    assert (body["aci"], body["device"]) == (str(ACI), 3)


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("/v1/websocket/", {"Authorization": basic(str(ACI), "wrong")}),
        ("/v1/websocket/", {"Authorization": "Bearer bad-token"}),
        ("/v1/websocket/", {"Authorization": "garbage"}),
        (f"/v1/websocket/?login={ACI}&password=wrong", {}),
        (f"/v1/websocket/?login={ACI}", {}),
    ],
)
def test_bad_credentials_rejected_with_403(client: TestClient, url: str, headers: dict[str, str]) -> None:
    with pytest.raises(WebSocketDenialResponse) as denied, client.websocket_connect(url, headers=headers):
        pass
    assert denied.value.status_code == 403


def test_authenticator_error_is_500() -> None:
    app = make_app()

    class Broken:
        async def authenticate_basic(self, header_value: str) -> None:
            raise RuntimeError("database down")

    app.state.services.authenticator = Broken()
    with TestClient(app) as client, pytest.raises(WebSocketDenialResponse) as denied:
        with client.websocket_connect("/v1/websocket/", headers={"Authorization": basic("a", "b")}):
            pass
    assert denied.value.status_code == 500


def test_header_rules(client: TestClient) -> None:
    upgrade_headers = {
        "User-Agent": "Signal-Desktop/7.0",
        "X-Signal-Agent": "OWD",
        "X-Custom": "from-upgrade",
        "X-Forwarded-For": "203.0.113.9",
        "Authorization": basic(str(ACI), PASSWORD),
    }
    inner = [
        "X-Custom:from-request",
        "user-agent:inner-agent",
        "no-colon-here",
        "x-colon:a:b",
        "X-Upper-Name:Value",
        "authorization:Basic Zm9vOmJhcg==",
        "x-forwarded-for:198.51.100.1",
        ":empty-name",
        "content-length:9999",
    ]
    with client.websocket_connect("/v1/websocket/", headers=upgrade_headers) as ws:
        ws.send_bytes(request_frame("GET", "/v1/headers?a=1&b=two%20words", 1, inner))
        body = json.loads(read_response(ws).body)
    pairs = body["headers"]
    names = [name for name, _ in pairs]
    headers = dict(pairs)
    assert headers["x-custom"] == "from-request"  # request overrides upgrade
    assert headers["user-agent"] == "Signal-Desktop/7.0"  # except the user agent
    assert headers["x-signal-agent"] == "OWD"  # upgrade headers merged in
    assert headers["x-upper-name"] == "Value"  # names lower-cased
    assert headers["x-forwarded-for"] == "203.0.113.9"  # inner one ignored
    assert "x-colon" not in headers and "no-colon-here" not in headers
    # The upgrade's credential is not copied into inner requests; the request's own header passes
    # through (registration sends the new account's credentials that way) but never authenticates.
    assert headers["authorization"] == "Basic Zm9vOmJhcg=="
    assert "content-length" not in headers  # no body; the client's value is not trusted
    assert not any(n.startswith("sec-websocket-") for n in names)
    assert "connection" not in headers and "upgrade" not in headers
    assert names.count("x-custom") == 1
    assert body["query"] == {"a": "1", "b": "two words"}
    assert body["path"] == "/v1/headers"
    assert body["client"] == "testclient"


# -------------------------------------------------------------------- framing


@pytest.mark.parametrize(
    "frame",
    [
        b"\xff\xff\xff\xff",
        WebSocketMessage(type=WebSocketMessage.UNKNOWN).SerializeToString(),
        b"",
        WebSocketMessage(type=WebSocketMessage.REQUEST).SerializeToString(),
        WebSocketMessage(
            type=WebSocketMessage.REQUEST, request=WebSocketRequestMessage(verb="GET")
        ).SerializeToString(),
        WebSocketMessage(
            type=WebSocketMessage.RESPONSE, request=WebSocketRequestMessage(verb="GET", path="/")
        ).SerializeToString(),
    ],
    ids=["garbage", "unknown-type", "empty", "request-without-body", "request-without-path", "mismatch"],
)
def test_badly_formatted_frame_closes_1007(client: TestClient, frame: bytes) -> None:
    with client.websocket_connect("/v1/websocket/") as ws:
        ws.send_bytes(frame)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_bytes()
    assert closed.value.code == 1007
    assert closed.value.reason == "Badly formatted"


def test_text_frames_are_ignored(client: TestClient) -> None:
    with client.websocket_connect("/v1/websocket/") as ws:
        ws.send_text("hello")
        ws.send_bytes(request_frame("GET", "/v1/whoami", 3))
        assert read_response(ws).id == 3


def test_request_without_id_gets_no_response(client: TestClient) -> None:
    with client.websocket_connect("/v1/websocket/") as ws:
        ws.send_bytes(request_frame("PUT", "/v1/record/first"))
        ws.send_bytes(request_frame("PUT", "/v1/record/second", 2))
        assert read_response(ws).id == 2
        ws.send_bytes(request_frame("GET", "/v1/whoami", 3))
        assert read_response(ws).id == 3
    assert sorted(client.app.state.recorded) == ["first", "second"]  # type: ignore[attr-defined]


def test_requests_are_handled_concurrently(client: TestClient) -> None:
    with client.websocket_connect("/v1/websocket/") as ws:
        ws.send_bytes(request_frame("GET", "/v1/wait", 1))
        ws.send_bytes(request_frame("GET", "/v1/release", 2))
        assert read_response(ws).id == 2
        assert read_response(ws).id == 1


def test_unhandled_error_is_500(client: TestClient) -> None:
    with client.websocket_connect("/v1/websocket/") as ws:
        ws.send_bytes(request_frame("GET", "/v1/boom", 8))
        response = read_response(ws)
        assert (response.id, response.status) == (8, 500)
        ws.send_bytes(request_frame("GET", "/v1/whoami", 9))  # the socket survives
        assert read_response(ws).status == 200


def test_oversize_frame_closes_1009() -> None:
    with TestClient(make_app(max_frame_bytes=1024)) as client:
        with client.websocket_connect("/v1/websocket/") as ws:
            ws.send_bytes(request_frame("PUT", "/v1/echo/a", 1, body=bytes(900)))
            assert read_response(ws).status == 201
            ws.send_bytes(request_frame("PUT", "/v1/echo/a", 2, body=bytes(2000)))
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_bytes()
    assert closed.value.code == 1009


def test_default_frame_limit_is_512_kib(client: TestClient) -> None:
    with client.websocket_connect("/v1/websocket/") as ws:
        ws.send_bytes(request_frame("PUT", "/v1/echo/a", 1, body=bytes(500 * 1024)))
        assert read_response(ws).status == 201
        ws.send_bytes(bytes(512 * 1024 + 1))
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_bytes()
    assert closed.value.code == 1009


def test_idle_timeout_closes_1000() -> None:
    with TestClient(make_app(idle_timeout_seconds=0.2)) as client:
        with client.websocket_connect("/v1/websocket/") as ws:
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_bytes()
    assert (closed.value.code, closed.value.reason) == (1000, "Timeout")


# ---------------------------------------------------- server-initiated requests


def test_server_request_round_trip_and_hooks() -> None:
    results: list[WebSocketResponse] = []
    events: list[str] = []
    done = threading.Event()
    tasks: list[asyncio.Task[None]] = []

    async def deliver(session: WebSocketSession) -> None:
        results.append(
            await session.send_request("PUT", "/api/v1/message", b"envelope", ["X-Signal-Timestamp:123"])
        )
        done.set()

    async def on_connected(session: WebSocketSession) -> None:
        assert session.principal is not None
        events.append(f"connected {session.principal.device_id}")
        tasks.append(asyncio.get_running_loop().create_task(deliver(session)))

    async def on_closed(session: WebSocketSession) -> None:
        events.append("closed")

    app = make_app(hooks={"connected": on_connected, "closed": on_closed})

    with TestClient(app) as client:
        # Anonymous sockets are not announced.
        with client.websocket_connect("/v1/websocket/") as ws:
            ws.send_bytes(request_frame("GET", "/v1/whoami", 1))
            read_response(ws)
        assert events == []

        headers = {"Authorization": basic(f"{ACI}.5", PASSWORD)}
        with client.websocket_connect("/v1/websocket/", headers=headers) as ws:
            frame = WebSocketMessage.FromString(ws.receive_bytes())
            assert frame.type == WebSocketMessage.REQUEST
            request = frame.request
            assert (request.verb, request.path, request.body) == ("PUT", "/api/v1/message", b"envelope")
            assert list(request.headers) == ["X-Signal-Timestamp:123"]
            assert 0 < request.id < 2**63
            # A tunnelled request may be interleaved before the acknowledgement.
            ws.send_bytes(request_frame("GET", "/v1/whoami", 7))
            assert read_response(ws).id == 7
            ack = WebSocketResponseMessage(id=request.id, status=200, message="OK")
            ws.send_bytes(WebSocketMessage(type=WebSocketMessage.RESPONSE, response=ack).SerializeToString())
            assert done.wait(5)
        assert events == ["connected 5", "closed"]

    assert len(results) == 1
    assert (results[0].id, results[0].status, results[0].message, results[0].body) == (
        request.id,
        200,
        "OK",
        None,
    )
    assert results[0].ok


# ------------------------------------------------ the session on a fake socket


class FakeSocket:
    """Just enough ASGI to drive a WebSocketSession without a server."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []
        self.scope: dict[str, Any] = {
            "type": "websocket",
            "path": "/v1/websocket/",
            "headers": [(b"host", b"example.org"), (b"user-agent", b"ua"), (b"sec-websocket-key", b"k")],
            "client": ("192.0.2.1", 1234),
            "server": ("example.org", 443),
            "scheme": "wss",
        }

    async def receive(self) -> MutableMapping[str, Any]:
        return await self.incoming.get()

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(dict(message))

    async def accepted(self) -> WebSocket:
        ws = WebSocket(self.scope, self.receive, self.send)
        await self.incoming.put({"type": "websocket.connect"})
        await ws.accept()
        self.sent.clear()
        return ws


async def _noop_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("not called")


async def test_pending_requests_fail_when_socket_closes() -> None:
    fake = FakeSocket()
    session = WebSocketSession(await fake.accepted(), _noop_app, None)
    reader = asyncio.create_task(session.run())
    future = await session.start_request("PUT", "/api/v1/message", None, [])
    sent = WebSocketMessage.FromString(fake.sent[-1]["bytes"])
    assert sent.request.id > 0 and not sent.request.HasField("body")
    await fake.incoming.put({"type": "websocket.disconnect", "code": 1001})
    await reader
    with pytest.raises(WebSocketClosedError):
        await future
    assert session.closed and session.close_code == 1001
    late = await session.start_request("PUT", "/x", None, [])
    with pytest.raises(WebSocketClosedError):
        await late


async def test_send_request_times_out_and_forgets() -> None:
    fake = FakeSocket()
    session = WebSocketSession(await fake.accepted(), _noop_app, None)
    reader = asyncio.create_task(session.run())
    with pytest.raises(TimeoutError):
        await session.send_request("PUT", "/api/v1/message", b"x", [], timeout_seconds=0.05)
    assert session._pending == {}
    # A late answer is ignored.
    request_id = WebSocketMessage.FromString(fake.sent[-1]["bytes"]).request.id
    late = WebSocketResponseMessage(id=request_id, status=200, message="OK")
    await fake.incoming.put(
        {
            "type": "websocket.receive",
            "bytes": WebSocketMessage(type=WebSocketMessage.RESPONSE, response=late).SerializeToString(),
        }
    )
    await session.close(4409, "Connected elsewhere")
    await reader
    assert fake.sent[-1] == {"type": "websocket.close", "code": 4409, "reason": "Connected elsewhere"}
    assert session.closed


async def test_close_from_another_task_stops_the_reader() -> None:
    fake = FakeSocket()
    session = WebSocketSession(await fake.accepted(), _noop_app, None)
    reader = asyncio.create_task(session.run())
    await asyncio.sleep(0)
    await session.close(4401, "Reauthentication required")
    await asyncio.wait_for(reader, 1)
    assert not reader.cancelled()
    await session.close(1000)  # idempotent
    assert [m["type"] for m in fake.sent] == ["websocket.close"]


async def test_build_scope() -> None:
    fake = FakeSocket()
    fake.scope["state"] = {"shared": 1}
    principal = FakePrincipal(ACI, 1)
    session = WebSocketSession(await fake.accepted(), _noop_app, principal)
    request = WebSocketRequestMessage(
        verb="put", path="/v1/a%20b?x=1", headers=["Content-Type:application/json"], body=b"{}"
    )
    scope = session.build_scope(request)
    assert scope["type"] == "http"
    assert scope["method"] == "PUT"
    assert (scope["path"], scope["raw_path"], scope["query_string"]) == ("/v1/a b", b"/v1/a%20b", b"x=1")
    assert scope["scheme"] == "https"
    assert scope["client"] == ("192.0.2.1", 1234)
    assert scope["mailslot.tunnel"] is True
    assert scope["mailslot.principal"] is principal
    assert scope["state"] == {"shared": 1} and scope["state"] is not fake.scope["state"]
    assert scope["headers"] == [
        (b"host", b"example.org"),
        (b"user-agent", b"ua"),
        (b"content-type", b"application/json"),
        (b"content-length", b"2"),
    ]


# --------------------------------------------------------- behind a real server


async def test_real_server_upgrade_403_and_round_trip() -> None:
    app = make_app()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}/v1/websocket/"

        with pytest.raises(websockets.InvalidStatus) as denied:
            async with websockets.connect(url, additional_headers={"Authorization": basic("x", "y")}):
                pass
        assert denied.value.response.status_code == 403

        headers = {"Authorization": basic(str(ACI), PASSWORD)}
        async with websockets.connect(url, additional_headers=headers) as ws:
            await ws.send(request_frame("GET", "/v1/whoami", 11))
            data = await ws.recv()
            assert isinstance(data, bytes)
            frame = WebSocketMessage.FromString(data)
            assert frame.response.id == 11
            assert json.loads(frame.response.body)["aci"] == str(ACI)
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 5)
