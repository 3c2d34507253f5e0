"""Pre-key endpoints (digest §4.1)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response
from pydantic import Field

from mailslot.api.auth import OptionalPrincipalDep, PrincipalDep, ServicesDep
from mailslot.api.errors import ApiError
from mailslot.api.registration import ECSignedPreKeyModel, KEMSignedPreKeyModel
from mailslot.api.types import Base64, WireModel, decode_base64_header
from mailslot.services.keys import KeyUpload
from mailslot.stores.models import PreKey

router = APIRouter(tags=["keys"])

Identity = Annotated[Literal["aci", "pni", "ACI", "PNI"], Query()]


class ECPreKeyModel(WireModel):
    keyId: int = Field(ge=0, le=2**31 - 1)
    publicKey: Base64


class SetKeysRequest(WireModel):
    preKeys: list[ECPreKeyModel] | None = Field(default=None, max_length=100)
    signedPreKey: ECSignedPreKeyModel | None = None
    pqPreKeys: list[KEMSignedPreKeyModel] | None = Field(default=None, max_length=100)
    pqLastResortPreKey: KEMSignedPreKeyModel | None = None


class PreKeyCount(WireModel):
    count: int
    pqCount: int


class CheckKeysRequest(WireModel):
    identityType: Literal["aci", "pni", "ACI", "PNI"] = "aci"
    digest: Base64


@router.put("/v2/keys", status_code=204,
            responses={400: {"description": "pni on an account without one"}, 401: {}, 422: {"description": "invalid"}})
async def set_keys(body: SetKeysRequest, principal: PrincipalDep, svc: ServicesDep,
                   identity: Identity = "aci") -> Response:
    upload = KeyUpload(
        pre_keys=[PreKey(k.keyId, k.publicKey) for k in body.preKeys or []],
        signed_pre_key=body.signedPreKey.to_key() if body.signedPreKey else None,
        pq_pre_keys=[k.to_key() for k in body.pqPreKeys or []],
        pq_last_resort_pre_key=body.pqLastResortPreKey.to_key() if body.pqLastResortPreKey else None,
    )
    await svc.keys.upload(principal, identity.lower(), upload)
    return Response(status_code=204)


@router.get("/v2/keys", response_model=PreKeyCount, responses={400: {}, 401: {}})
async def key_counts(principal: PrincipalDep, svc: ServicesDep, identity: Identity = "aci") -> dict[str, int]:
    return await svc.keys.counts(principal, identity.lower())


@router.post("/v2/keys/check", status_code=200,
             responses={401: {}, 409: {"description": "keys differ"}, 422: {}})
async def check_keys(body: CheckKeysRequest, principal: PrincipalDep, svc: ServicesDep) -> Response:
    if len(body.digest) != 32:
        raise ApiError(422, "invalid_request", "digest: must be 32 bytes")
    if await svc.keys.check(principal, body.identityType.lower(), body.digest):
        return Response(status_code=200)
    return Response(status_code=409)


class PreKeyResponse(WireModel):
    identityKey: str
    devices: list[dict[str, Any]]


@router.get(
    "/v2/keys/{identifier}/{device_id}",
    response_model=PreKeyResponse,
    responses={400: {}, 401: {"description": "unauthorized (also for unknown accounts when anonymous)"},
               404: {"description": "unknown account, device, or no keys"}, 422: {}, 429: {}},
)
async def get_bundle(
    identifier: str,
    device_id: str,
    principal: OptionalPrincipalDep,
    svc: ServicesDep,
    unidentified_access_key: Annotated[str | None, Header()] = None,
    group_send_token: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    if group_send_token is not None:
        if principal is not None or unidentified_access_key is not None:
            raise ApiError(400, "conflicting_credentials", "a group send token cannot be combined with other auth")
        raise ApiError(401, "unsupported_credential", "group send tokens are not offered by this server")
    access_key: bytes | None = None
    if principal is None and unidentified_access_key is not None:
        access_key = decode_base64_header(unidentified_access_key)
    return await svc.keys.fetch_bundle(principal, access_key, identifier, device_id)
