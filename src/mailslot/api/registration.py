"""Verification sessions and ``POST /v1/registration`` (digest §1)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from mailslot.api.auth import ServicesDep, client_ip
from mailslot.api.errors import ApiError
from mailslot.api.types import Base64, Base64Unpadded, WireModel
from mailslot.services.accounts import AccountAttributes, RegistrationRequest, identity_response
from mailslot.services.credentials import parse_basic
from mailslot.services.phone import normalize_number
from mailslot.stores.models import SignedPreKey

router = APIRouter(tags=["registration"])

SESSION_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid session id or number not normalised"},
    404: {"description": "unknown or expired session"},
    422: {"description": "malformed request"},
    429: {"description": "rate limited"},
}


class SessionResponse(WireModel):
    id: str
    nextSms: int | None
    nextCall: int | None
    nextVerificationAttempt: int | None
    allowedToRequestCode: bool
    requestedInformation: list[str]
    verified: bool


# Push tokens are stored: printable ASCII only (FCM, APNs and UnifiedPush tokens all are). A NUL
# character would otherwise reach the database, which PostgreSQL refuses with an error.
PUSH_TOKEN_PATTERN = r"^[\x20-\x7E]+$"


class UpdateSessionRequest(WireModel):
    pushToken: str | None = Field(default=None, max_length=4096, pattern=PUSH_TOKEN_PATTERN)
    pushTokenType: Literal["apn", "fcm"] | None = None
    pushChallenge: str | None = Field(default=None, max_length=256)
    captcha: str | None = Field(default=None, max_length=65536)
    mcc: str | None = Field(default=None, max_length=3)
    mnc: str | None = Field(default=None, max_length=3)


class CreateSessionRequest(UpdateSessionRequest):
    number: str = Field(max_length=32)


class RequestCodeBody(WireModel):
    transport: Literal["sms", "voice"]
    client: str = Field(default="", max_length=64)


class SubmitCodeBody(WireModel):
    code: str = Field(min_length=1, max_length=16, pattern=r"^[0-9]+$")


def _check_push_pair(body: UpdateSessionRequest) -> None:
    if (body.pushToken is None) != (body.pushTokenType is None):
        raise ApiError(422, "invalid_request", "pushToken and pushTokenType go together")


@router.post("/v1/verification/session", response_model=SessionResponse, responses=SESSION_RESPONSES)
async def create_session(body: CreateSessionRequest, request: Request, svc: ServicesDep) -> dict[str, Any]:
    _check_push_pair(body)
    view = await svc.verification.create(body.number, client_ip(request), body.pushToken, body.pushTokenType)
    return view.to_json()


@router.get("/v1/verification/session/{session_id}", response_model=SessionResponse, responses=SESSION_RESPONSES)
async def get_session(session_id: str, svc: ServicesDep) -> dict[str, Any]:
    return (await svc.verification.get(session_id)).to_json()


@router.patch("/v1/verification/session/{session_id}", response_model=SessionResponse, responses=SESSION_RESPONSES)
async def update_session(session_id: str, body: UpdateSessionRequest, svc: ServicesDep) -> dict[str, Any]:
    _check_push_pair(body)
    return (await svc.verification.update(session_id, body.pushToken, body.pushTokenType)).to_json()


@router.post(
    "/v1/verification/session/{session_id}/code",
    response_model=SessionResponse,
    responses={**SESSION_RESPONSES, 409: {"description": "already verified"}, 440: {"description": "provider"}},
)
async def request_code(
    session_id: str,
    body: RequestCodeBody,
    svc: ServicesDep,
    accept_language: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    locale = accept_language.split(",")[0].strip()[:35] if accept_language else None
    return (await svc.verification.request_code(session_id, body.transport, locale)).to_json()


@router.put(
    "/v1/verification/session/{session_id}/code",
    response_model=SessionResponse,
    responses={**SESSION_RESPONSES, 409: {"description": "no code requested"}},
)
async def submit_code(session_id: str, body: SubmitCodeBody, svc: ServicesDep) -> dict[str, Any]:
    return (await svc.verification.submit_code(session_id, body.code)).to_json()


class ECSignedPreKeyModel(WireModel):
    keyId: int = Field(ge=0, le=2**31 - 1)
    publicKey: Base64
    signature: Base64Unpadded

    def to_key(self) -> SignedPreKey:
        return SignedPreKey(self.keyId, self.publicKey, self.signature)


class KEMSignedPreKeyModel(ECSignedPreKeyModel):
    pass


class AccountAttributesModel(WireModel):
    fetchesMessages: bool = False
    registrationId: int = Field(ge=1, le=0x3FFF)
    pniRegistrationId: int | None = Field(default=None, ge=1, le=0x3FFF)
    name: Base64 | None = None
    capabilities: dict[str, bool] = Field(default_factory=dict)
    registrationLock: str | None = Field(default=None, pattern=r"^([0-9A-Fa-f]{64})?$")
    unidentifiedAccessKey: Base64 | None = None
    unrestrictedUnidentifiedAccess: bool = False
    discoverableByPhoneNumber: bool = True
    recoveryPassword: Base64 | None = None

    def to_attributes(self) -> AccountAttributes:
        if self.name is not None and len(self.name) > 225:
            raise ApiError(422, "invalid_request", "name: at most 225 bytes")
        if self.unidentifiedAccessKey is not None and len(self.unidentifiedAccessKey) != 16:
            raise ApiError(422, "invalid_request", "unidentifiedAccessKey: must be 16 bytes")
        if self.recoveryPassword is not None and len(self.recoveryPassword) not in (0, 32):
            raise ApiError(422, "invalid_request", "recoveryPassword: must be 32 bytes")
        return AccountAttributes(
            fetches_messages=self.fetchesMessages,
            registration_id=self.registrationId,
            pni_registration_id=self.pniRegistrationId,
            name=self.name,
            capabilities=self.capabilities,
            registration_lock=self.registrationLock or None,
            unidentified_access_key=self.unidentifiedAccessKey,
            unrestricted_unidentified_access=self.unrestrictedUnidentifiedAccess,
            discoverable_by_phone_number=self.discoverableByPhoneNumber,
            recovery_password=self.recoveryPassword or None,
        )


class ApnToken(WireModel):
    apnRegistrationId: str = Field(min_length=1, max_length=4096, pattern=PUSH_TOKEN_PATTERN)


class GcmToken(WireModel):
    gcmRegistrationId: str = Field(min_length=1, max_length=4096, pattern=PUSH_TOKEN_PATTERN)


class RegistrationBody(WireModel):
    sessionId: str | None = Field(default=None, max_length=128)
    recoveryPassword: Base64 | None = None
    totp: int | None = Field(default=None, ge=0)
    accountAttributes: AccountAttributesModel
    skipDeviceTransfer: bool
    aciIdentityKey: Base64
    pniIdentityKey: Base64 | None = None
    aciSignedPreKey: ECSignedPreKeyModel
    pniSignedPreKey: ECSignedPreKeyModel | None = None
    aciPqLastResortPreKey: KEMSignedPreKeyModel
    pniPqLastResortPreKey: KEMSignedPreKeyModel | None = None
    apnToken: ApnToken | None = None
    gcmToken: GcmToken | None = None


class AccountIdentityResponse(WireModel):
    uuid: str
    number: str | None
    pni: str | None
    usernameHash: str | None
    usernameLinkHandle: str | None
    storageCapable: bool
    entitlements: dict[str, Any]


class AccountCreationResponse(AccountIdentityResponse):
    reregistration: bool


@router.post(
    "/v1/registration",
    response_model=AccountCreationResponse,
    responses={
        400: {"description": "invalid session"}, 401: {"description": "session not verified"},
        403: {"description": "wrong recovery password"}, 409: {"description": "device transfer possible"},
        422: {"description": "invalid request or signature"}, 423: {"description": "registration lock"},
        429: {"description": "rate limited"}, 441: {"description": "TOTP required"},
        499: {"description": "required capability missing"},
    },
)
async def register(
    body: RegistrationBody,
    request: Request,
    svc: ServicesDep,
    x_signal_agent: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    header = request.headers.get("authorization", "")
    credentials = parse_basic(header) if header else None
    if credentials is None:
        raise ApiError(401, "unauthorized", "Basic credentials (number:password) are required",
                       headers={"WWW-Authenticate": 'Basic realm="Mailslot"'})
    number_text, password = credentials
    number = normalize_number(number_text, svc.settings.registration.test_numbers)
    if body.recoveryPassword is not None and len(body.recoveryPassword) != 32:
        raise ApiError(422, "invalid_request", "recoveryPassword: must be 32 bytes")
    registration = RegistrationRequest(
        session_id=body.sessionId,
        recovery_password=body.recoveryPassword,
        totp=body.totp,
        attributes=body.accountAttributes.to_attributes(),
        skip_device_transfer=body.skipDeviceTransfer,
        aci_identity_key=body.aciIdentityKey,
        pni_identity_key=body.pniIdentityKey,
        aci_signed_pre_key=body.aciSignedPreKey.to_key(),
        pni_signed_pre_key=body.pniSignedPreKey.to_key() if body.pniSignedPreKey else None,
        aci_pq_last_resort_pre_key=body.aciPqLastResortPreKey.to_key(),
        pni_pq_last_resort_pre_key=body.pniPqLastResortPreKey.to_key() if body.pniPqLastResortPreKey else None,
        apn_token=body.apnToken.apnRegistrationId if body.apnToken else None,
        gcm_token=body.gcmToken.gcmRegistrationId if body.gcmToken else None,
    )
    result = await svc.accounts.register(number, password, registration, x_signal_agent)
    response = identity_response(result.account)
    response["storageCapable"] = result.storage_capable
    response["reregistration"] = result.reregistration
    return JSONResponse(response)
