"""Devices and linking (digest §3)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from pydantic import Field

from mailslot.api.auth import PrincipalDep, ServicesDep
from mailslot.api.errors import ApiError
from mailslot.api.registration import ApnToken, ECSignedPreKeyModel, GcmToken, KEMSignedPreKeyModel
from mailslot.api.types import Base64, WireModel
from mailslot.services.accounts import AccountAttributes
from mailslot.services.credentials import parse_basic
from mailslot.services.devices import LinkRequest

router = APIRouter(tags=["devices"])


class DeviceAttributesModel(WireModel):
    fetchesMessages: bool = False
    registrationId: int = Field(ge=1, le=0x3FFF)
    pniRegistrationId: int | None = Field(default=None, ge=1, le=0x3FFF)
    name: Base64 | None = None
    capabilities: dict[str, bool]


class LinkDeviceRequest(WireModel):
    verificationCode: str = Field(min_length=1, max_length=512)
    accountAttributes: DeviceAttributesModel
    aciSignedPreKey: ECSignedPreKeyModel
    aciPqLastResortPreKey: KEMSignedPreKeyModel
    pniSignedPreKey: ECSignedPreKeyModel | None = None
    pniPqLastResortPreKey: KEMSignedPreKeyModel | None = None
    apnToken: ApnToken | None = None
    gcmToken: GcmToken | None = None


class LinkDeviceResponse(WireModel):
    uuid: str
    pni: str | None
    deviceId: int


class ProvisioningCode(WireModel):
    verificationCode: str
    tokenIdentifier: str


class ProvisioningMessage(WireModel):
    body: str = Field(max_length=400_000)


class DeviceName(WireModel):
    deviceName: Base64


@router.get("/v1/devices", responses={401: {}})
async def list_devices(principal: PrincipalDep, svc: ServicesDep) -> dict[str, Any]:
    return svc.devices.list_devices(principal)


@router.delete(
    "/v1/devices/{device_id}",
    status_code=204,
    responses={401: {"description": "a linked device removing another"}, 403: {"description": "the primary"}, 404: {}},
)
async def remove_device(
    device_id: Annotated[int, Path(ge=1, le=127)], principal: PrincipalDep, svc: ServicesDep
) -> Response:
    await svc.devices.remove(principal, device_id)
    return Response(status_code=204)


@router.get(
    "/v1/devices/provisioning/code",
    response_model=ProvisioningCode,
    responses={401: {"description": "not the primary"}, 411: {"description": "device limit"}, 429: {}},
)
async def provisioning_code(principal: PrincipalDep, svc: ServicesDep) -> dict[str, str]:
    return await svc.devices.provisioning_code(principal)


@router.put(
    "/v1/devices/link",
    response_model=LinkDeviceResponse,
    responses={
        401: {},
        403: {"description": "bad, expired or used token"},
        411: {"description": "device limit"},
        422: {},
        429: {},
    },
)
async def link_device(
    body: LinkDeviceRequest,
    request: Request,
    svc: ServicesDep,
    x_signal_agent: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """The Basic header carries the new device's password (its username is not used)."""
    header = request.headers.get("authorization", "")
    credentials = parse_basic(header) if header else None
    if credentials is None:
        raise ApiError(
            401,
            "unauthorized",
            "Basic credentials with the new device's password are required",
            headers={"WWW-Authenticate": 'Basic realm="Mailslot"'},
        )
    attrs = body.accountAttributes
    if attrs.name is not None and len(attrs.name) > 225:
        raise ApiError(422, "invalid_request", "accountAttributes.name: at most 225 bytes")
    link = LinkRequest(
        verification_code=body.verificationCode,
        attributes=AccountAttributes(
            fetches_messages=attrs.fetchesMessages,
            registration_id=attrs.registrationId,
            pni_registration_id=attrs.pniRegistrationId,
            name=attrs.name,
            capabilities=attrs.capabilities,
        ),
        aci_signed_pre_key=body.aciSignedPreKey.to_key(),
        aci_pq_last_resort_pre_key=body.aciPqLastResortPreKey.to_key(),
        pni_signed_pre_key=body.pniSignedPreKey.to_key() if body.pniSignedPreKey else None,
        pni_pq_last_resort_pre_key=body.pniPqLastResortPreKey.to_key() if body.pniPqLastResortPreKey else None,
        apn_token=body.apnToken.apnRegistrationId if body.apnToken else None,
        gcm_token=body.gcmToken.gcmRegistrationId if body.gcmToken else None,
    )
    return await svc.devices.link(credentials[1], link, x_signal_agent)


@router.get(
    "/v1/devices/wait_for_linked_device/{token_identifier}",
    responses={204: {"description": "timed out"}, 400: {}, 429: {}},
)
async def wait_for_linked_device(
    token_identifier: str,
    principal: PrincipalDep,
    svc: ServicesDep,
    wait: Annotated[int, Query(alias="timeout", ge=1, le=3600)] = 30,
) -> Any:
    info = await svc.devices.wait_for_linked_device(principal, token_identifier, wait)
    return info if info is not None else Response(status_code=204)


@router.put("/v1/devices/capabilities", status_code=204, responses={401: {}})
async def set_capabilities(body: dict[str, bool], principal: PrincipalDep, svc: ServicesDep) -> Response:
    await svc.devices.set_capabilities(principal, body)
    return Response(status_code=204)


@router.put("/v1/accounts/name", status_code=204, responses={401: {}, 403: {}, 404: {}, 422: {}})
async def set_device_name(
    body: DeviceName,
    principal: PrincipalDep,
    svc: ServicesDep,
    device_id: Annotated[int | None, Query(alias="deviceId", ge=1, le=127)] = None,
) -> Response:
    if len(body.deviceName) > 225:
        raise ApiError(422, "invalid_request", "deviceName: at most 225 bytes")
    await svc.devices.set_name(principal, device_id, body.deviceName)
    return Response(status_code=204)


@router.put(
    "/v1/provisioning/{destination}",
    status_code=204,
    responses={400: {"description": "too large"}, 401: {}, 404: {"description": "nobody listening"}, 429: {}},
)
async def provisioning_message(
    destination: str, body: ProvisioningMessage, principal: PrincipalDep, svc: ServicesDep
) -> Response:
    await svc.provisioning.send(principal, svc.limiters, destination, body.body)
    return Response(status_code=204)


@router.get("/v1/keepalive/provisioning", tags=["websocket"])
async def provisioning_keepalive() -> Response:
    return Response(status_code=200)
