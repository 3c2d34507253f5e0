"""Message endpoints (digest §5): sending, and the polling fallback for clients without a socket."""

from __future__ import annotations

import base64
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import Field

from mailslot.api.auth import OptionalPrincipalDep, PrincipalDep, ServicesDep
from mailslot.api.errors import ApiError
from mailslot.api.types import Base64, WireModel, decode_base64_header
from mailslot.protocol.envelope_pb2 import Envelope
from mailslot.services.delivery import IncomingMessage, SendRequest

router = APIRouter(tags=["messages"])

MULTI_RECIPIENT_TYPE = "application/vnd.signal-messenger.mrm"
MAX_MULTI_RECIPIENT_BODY = (256 * 1024 + 32) + 5000 * 100


class IncomingMessageModel(WireModel):
    type: int
    destinationDeviceId: int = Field(ge=1, le=127)
    destinationRegistrationId: int = Field(ge=0, le=0x3FFF)
    content: Base64


class IncomingMessageList(WireModel):
    messages: list[IncomingMessageModel] = Field(max_length=127)
    timestamp: int = 0
    online: bool = False
    urgent: bool = True


class SendMessageResponse(WireModel):
    needsSync: bool


def _access_key(value: str | None) -> bytes | None:
    return None if value is None else decode_base64_header(value)


# Registered before /v1/messages/{destination}, which would otherwise take this path.
@router.put(
    "/v1/messages/multi_recipient",
    responses={400: {}, 401: {}, 404: {}, 409: {}, 410: {}, 413: {}, 415: {}},
)
async def send_multi_recipient(
    request: Request,
    svc: ServicesDep,
    ts: Annotated[int, Query()] = 0,
    online: bool = False,
    urgent: bool = True,
    story: bool = False,
    unidentified_access_key: Annotated[str | None, Header()] = None,
    group_send_token: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != MULTI_RECIPIENT_TYPE:
        raise ApiError(415, "unsupported_media_type", f"the body must be {MULTI_RECIPIENT_TYPE}")
    if group_send_token is not None:
        if story or unidentified_access_key is not None:
            raise ApiError(400, "conflicting_credentials", "a group send token cannot be combined with other auth")
        raise ApiError(401, "unsupported_credential", "group send tokens are not offered by this server")
    payload = await request.body()
    if len(payload) > MAX_MULTI_RECIPIENT_BODY:
        raise ApiError(413, "payload_too_large", "multi-recipient payload is too large")
    access_key = None if story else _access_key(unidentified_access_key)
    return await svc.delivery.send_multi_recipient(access_key, payload, ts, online, urgent, story)


@router.put(
    "/v1/messages/{destination}",
    response_model=SendMessageResponse,
    responses={400: {}, 401: {}, 403: {"description": "sync message to a PNI"}, 404: {},
               409: {"description": "missingDevices/extraDevices"}, 410: {"description": "staleDevices"},
               413: {}, 422: {}, 429: {}},
)
async def send_message(
    destination: str,
    body: IncomingMessageList,
    principal: OptionalPrincipalDep,
    svc: ServicesDep,
    story: bool = False,
    unidentified_access_key: Annotated[str | None, Header()] = None,
    group_send_token: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    if group_send_token is not None:
        if story or principal is not None or unidentified_access_key is not None:
            raise ApiError(400, "conflicting_credentials", "a group send token cannot be combined with other auth")
        raise ApiError(401, "unsupported_credential", "group send tokens are not offered by this server")
    sender = None if story else principal
    return await svc.delivery.send(
        sender, _access_key(unidentified_access_key), destination, send_request_from(body), story
    )


def send_request_from(body: IncomingMessageList) -> SendRequest:
    return SendRequest(
        messages=[
            IncomingMessage(m.type, m.destinationDeviceId, m.destinationRegistrationId, m.content)
            for m in body.messages
        ],
        timestamp=body.timestamp,
        online=body.online,
        urgent=body.urgent,
    )


def _entity(envelope_bytes: bytes) -> dict[str, Any]:
    """``OutgoingMessageEntity`` of the retired polling API (§5.4)."""
    envelope = Envelope.FromString(envelope_bytes)
    return {
        "guid": str(uuid.UUID(bytes=envelope.server_guid)),
        "type": envelope.type,
        "timestamp": envelope.client_timestamp,
        "sourceUuid": envelope.source_service_id_string or None,
        "sourceDevice": envelope.source_device if envelope.HasField("source_device") else None,
        "destinationUuid": envelope.destination_service_id_string,
        "updatedPni": None,
        "content": base64.b64encode(envelope.content).decode(),
        "serverTimestamp": envelope.server_timestamp,
        "urgent": envelope.urgent,
        "story": envelope.story,
        "reportSpamToken": None,
    }


@router.get("/v1/messages", responses={401: {}, 422: {}})
async def poll_messages(
    principal: PrincipalDep,
    svc: ServicesDep,
    wait: Annotated[float, Query(alias="timeout", ge=0, le=60)] = 0,
    x_signal_receive_stories: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """Long-poll: answers at once when messages are queued, else when one arrives or ``timeout`` ends."""
    messages = await svc.delivery.wait_for_messages(principal.aci, principal.device_id, wait)
    receive_stories = (x_signal_receive_stories or "").lower() == "true"
    entities = [_entity(m.envelope) for m in messages if receive_stories or not m.story]
    return {"messages": entities, "more": len(messages) >= 100}


@router.delete("/v1/messages/uuid/{guid}", status_code=204, responses={401: {}})
async def acknowledge_message(guid: uuid.UUID, principal: PrincipalDep, svc: ServicesDep) -> Response:
    """Idempotent: deleting a message that is already gone also answers 204."""
    await svc.delivery.take_by_guid(principal.aci, principal.device_id, guid)
    return Response(status_code=204)
