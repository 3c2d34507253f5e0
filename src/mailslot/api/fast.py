"""The per-message route without the ASGI stack.

``PUT /v1/messages/{destination}`` tunnelled over a WebSocket is the hottest request the server
handles. Routing, dependency resolution and middleware cost more than the send itself, so the tunnel
hands this one request here. The rules are the route's own: the same body model, the same service call,
the same error bodies (``mailslot.api.errors``); anything unusual (stories, group-send tokens, other
paths) falls back to the full stack.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import ValidationError

from mailslot.api.errors import (
    ErrorParts,
    rate_limited_parts,
    service_error_parts,
    validation_error_parts,
)
from mailslot.api.messages import IncomingMessageList, send_request_from
from mailslot.api.types import decode_base64_header
from mailslot.observability.metrics import HTTP_LATENCY, HTTP_REQUESTS
from mailslot.protocol.websocket_pb2 import WebSocketRequestMessage
from mailslot.services.container import Services
from mailslot.services.credentials import Principal
from mailslot.services.errors import ServiceError
from mailslot.services.ratelimit import RateLimitExceeded

ROUTE = "/v1/messages/{destination}"
_PREFIX = "/v1/messages/"
_JSON = "Content-Type:application/json"


async def current_principal(services: Services, principal: Principal | None) -> Principal | None:
    """The socket's principal if its device and credential still stand (see ``api.auth``)."""
    if principal is None:
        return None
    account = await services.accounts.get_by_aci(principal.aci)
    device = account.device(principal.device_id) if account else None
    if account is None or device is None or device.auth_hash != principal.device.auth_hash:
        return None
    return Principal(account, device)


def _answer(status: int, headers: dict[str, str], body: Any) -> tuple[int, list[str], bytes]:
    encoded = json.dumps(body, separators=(",", ":")).encode()
    out = [_JSON, f"Content-Length:{len(encoded)}", f"X-Signal-Timestamp:{int(time.time() * 1000)}"]
    out.extend(f"{name}:{value}" for name, value in headers.items())
    return status, out, encoded


class TunnelFastPath:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, session: Any, request: WebSocketRequestMessage) -> tuple[int, list[str], bytes] | None:
        path = request.path
        if request.verb != "PUT" or not path.startswith(_PREFIX) or "?" in path:
            return None
        destination = path[len(_PREFIX):]
        if not destination or "/" in destination or destination == "multi_recipient" or "%" in destination:
            return None
        headers = session.request_headers(request)
        if "group-send-token" in headers:
            return None
        started = time.perf_counter()
        status, answer = await self._send(session, destination, headers, request.body)
        HTTP_REQUESTS.labels(ROUTE, "PUT", str(status), "websocket").inc()
        HTTP_LATENCY.labels(ROUTE).observe(time.perf_counter() - started)
        return answer

    async def _send(
        self, session: Any, destination: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, tuple[int, list[str], bytes]]:
        services: Services = self.app.state.services
        parts: ErrorParts
        if not body:
            parts = validation_error_parts([{"loc": ("body",), "msg": "Field required", "type": "missing"}])
            return parts[0], _answer(*parts)
        try:
            model = IncomingMessageList.model_validate_json(body)
        except ValidationError as exc:
            parts = validation_error_parts(exc.errors(), ("body",))
            return parts[0], _answer(*parts)
        principal = await current_principal(services, session.principal)
        access = headers.get("unidentified-access-key")
        try:
            result = await services.delivery.send(
                principal, decode_base64_header(access) if access is not None else None, destination,
                send_request_from(model),
            )
        except ServiceError as exc:
            parts = service_error_parts(exc)
        except RateLimitExceeded as exc:
            parts = rate_limited_parts(exc)
        else:
            return 200, _answer(200, {}, result)
        return parts[0], _answer(*parts)
