"""Account endpoints (digest §10), registration lock (§2.4), TOTP and JWT sessions (API.md §1.2)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from pydantic import Field

from mailslot.api.auth import PrimaryDep, PrincipalDep, ServicesDep, client_ip, is_authenticated_request
from mailslot.api.errors import ApiError, unauthorized
from mailslot.api.registration import AccountAttributesModel, AccountIdentityResponse, ApnToken, GcmToken
from mailslot.api.types import WireModel
from mailslot.services import totp as totp_rules
from mailslot.services.accounts import identity_response
from mailslot.services.credentials import AuthenticationFailed, parse_basic

router = APIRouter(tags=["accounts"])

AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {401: {"description": "missing or invalid credentials"}}


@router.get("/v1/accounts/whoami", response_model=AccountIdentityResponse, responses=AUTH_RESPONSES)
async def whoami(principal: PrincipalDep) -> dict[str, Any]:
    return identity_response(principal.account)


@router.put("/v1/accounts/attributes/", status_code=204, responses={**AUTH_RESPONSES, 422: {}})
@router.put("/v1/accounts/attributes", status_code=204, include_in_schema=False)
async def set_attributes(
    body: AccountAttributesModel,
    principal: PrincipalDep,
    svc: ServicesDep,
    x_signal_agent: Annotated[str | None, Header()] = None,
) -> Response:
    await svc.accounts.set_attributes(principal.account, principal.device, body.to_attributes(), x_signal_agent)
    return Response(status_code=204)


@router.put("/v1/accounts/gcm/", status_code=204, responses=AUTH_RESPONSES)
@router.put("/v1/accounts/gcm", status_code=204, include_in_schema=False)
async def set_gcm(body: GcmToken, principal: PrincipalDep, svc: ServicesDep) -> Response:
    await svc.accounts.set_push_token(principal.account, principal.device, "gcm", body.gcmRegistrationId)
    return Response(status_code=204)


@router.delete("/v1/accounts/gcm/", status_code=204, responses=AUTH_RESPONSES)
@router.delete("/v1/accounts/gcm", status_code=204, include_in_schema=False)
async def clear_gcm(principal: PrincipalDep, svc: ServicesDep) -> Response:
    await svc.accounts.set_push_token(principal.account, principal.device, "gcm", None)
    return Response(status_code=204)


@router.put("/v1/accounts/apn/", status_code=204, responses=AUTH_RESPONSES)
@router.put("/v1/accounts/apn", status_code=204, include_in_schema=False)
async def set_apn(body: ApnToken, principal: PrincipalDep, svc: ServicesDep) -> Response:
    await svc.accounts.set_push_token(principal.account, principal.device, "apn", body.apnRegistrationId)
    return Response(status_code=204)


@router.delete("/v1/accounts/apn/", status_code=204, responses=AUTH_RESPONSES)
@router.delete("/v1/accounts/apn", status_code=204, include_in_schema=False)
async def clear_apn(principal: PrincipalDep, svc: ServicesDep) -> Response:
    await svc.accounts.set_push_token(principal.account, principal.device, "apn", None)
    return Response(status_code=204)


class RegistrationLockBody(WireModel):
    registrationLock: str = Field(pattern=r"^[0-9A-Fa-f]{64}$")


@router.put("/v1/accounts/registration_lock", status_code=204, responses={**AUTH_RESPONSES, 422: {}})
async def set_registration_lock(body: RegistrationLockBody, principal: PrimaryDep, svc: ServicesDep) -> Response:
    await svc.accounts.set_registration_lock(principal.account, body.registrationLock)
    return Response(status_code=204)


@router.delete("/v1/accounts/registration_lock", status_code=204, responses=AUTH_RESPONSES)
async def clear_registration_lock(principal: PrimaryDep, svc: ServicesDep) -> Response:
    await svc.accounts.set_registration_lock(principal.account, None)
    return Response(status_code=204)


@router.delete("/v1/accounts/me", status_code=204, responses=AUTH_RESPONSES)
async def delete_account(principal: PrincipalDep, svc: ServicesDep) -> Response:
    await svc.accounts.delete(principal.account)
    return Response(status_code=204)


@router.get("/v2/accounts/data_report", responses=AUTH_RESPONSES)
async def data_report(principal: PrincipalDep, svc: ServicesDep) -> dict[str, Any]:
    return svc.accounts.data_report(principal.account)


@router.head(
    "/v1/accounts/account/{service_id}",
    responses={400: {"description": "authenticated request"}, 404: {"description": "no such account"},
               429: {"description": "rate limited"}},
)
async def account_exists(service_id: str, request: Request, svc: ServicesDep) -> Response:
    if is_authenticated_request(request):
        raise ApiError(400, "must_be_anonymous", "this request must be unauthenticated")
    await svc.limiters.check("checkAccountExistence", client_ip(request))
    aci = pni = None
    try:
        if service_id.startswith("PNI:"):
            pni = uuid.UUID(service_id[4:])
        else:
            aci = uuid.UUID(service_id)
    except ValueError as exc:
        raise ApiError(400, "invalid_service_id", "not a service id") from exc
    found = await svc.accounts.exists(aci, pni)
    return Response(status_code=200 if found else 404)


# -- TOTP ----------------------------------------------------------------------------------------


class TotpEnrolmentResponse(WireModel):
    secret: str
    uri: str
    backupCodes: list[str]


class TotpCodeBody(WireModel):
    code: int = Field(ge=0, le=999_999)


@router.put("/v1/accounts/totp", response_model=TotpEnrolmentResponse, responses=AUTH_RESPONSES)
async def start_totp(principal: PrimaryDep, svc: ServicesDep) -> dict[str, Any]:
    """Start enrolment: TOTP is enforced once a current code is confirmed at ``/v1/accounts/totp/confirm``."""
    enrolment = totp_rules.start_enrolment(principal.account)
    await svc.accounts.store.update_account(principal.account)
    return {"secret": enrolment.secret, "uri": enrolment.uri, "backupCodes": enrolment.backup_codes}


@router.put("/v1/accounts/totp/confirm", status_code=204,
            responses={**AUTH_RESPONSES, 409: {"description": "no enrolment"}, 422: {"description": "wrong code"}})
async def confirm_totp(body: TotpCodeBody, principal: PrimaryDep, svc: ServicesDep) -> Response:
    if not principal.account.totp_pending_secret:
        raise ApiError(409, "no_enrolment", "no TOTP enrolment is in progress")
    await svc.limiters.check("checkTotp", str(principal.aci))
    if not totp_rules.confirm_enrolment(principal.account, body.code):
        raise ApiError(422, "invalid_code", "the code does not match")
    await svc.accounts.store.update_account(principal.account)
    return Response(status_code=204)


@router.delete("/v1/accounts/totp", status_code=204,
               responses={**AUTH_RESPONSES, 403: {"description": "primary only"}, 404: {"description": "not enrolled"},
                          422: {"description": "wrong code"}, 429: {"description": "rate limited"}})
async def remove_totp(body: TotpCodeBody, principal: PrimaryDep, svc: ServicesDep) -> Response:
    if not principal.account.totp_secret:
        raise ApiError(404, "not_enrolled", "TOTP is not enabled")
    await svc.limiters.check("checkTotp", str(principal.aci))
    if not totp_rules.current_code_ok(principal.account, body.code):
        raise ApiError(422, "invalid_code", "a current TOTP code is required")
    totp_rules.remove(principal.account)
    await svc.accounts.store.update_account(principal.account)
    return Response(status_code=204)


# -- JWT sessions --------------------------------------------------------------------------------


class SessionTokens(WireModel):
    accessToken: str
    refreshToken: str
    expiresIn: int


class RefreshBody(WireModel):
    refreshToken: str = Field(min_length=1, max_length=4096)


@router.post("/v1/auth/session", response_model=SessionTokens, responses={**AUTH_RESPONSES, 429: {}})
async def create_session(request: Request, svc: ServicesDep) -> dict[str, Any]:
    """Exchange device credentials (Basic only: a token cannot mint tokens) for a session."""
    header = request.headers.get("authorization", "")
    credentials = parse_basic(header) if header and not request.scope.get("mailslot.tunnel") else None
    await svc.limiters.check("authSession", client_ip(request))
    principal = await svc.authenticator.authenticate_password(*credentials) if credentials else None
    if principal is None:
        raise unauthorized()
    return await svc.tokens.issue(principal.aci, principal.device)


@router.post("/v1/auth/session/refresh", response_model=SessionTokens, responses=AUTH_RESPONSES)
async def refresh_session(body: RefreshBody, svc: ServicesDep) -> dict[str, Any]:
    """Rotate a refresh token; presenting a spent one revokes its whole family."""
    try:
        return await svc.tokens.rotate(body.refreshToken, svc.accounts)
    except AuthenticationFailed as exc:
        raise unauthorized() from exc
