"""Group endpoints (GROUPS.md). Authorised by ``Group-Auth`` only: a request carrying account
credentials, or arriving on an authenticated socket, is refused, so the server cannot tie member keys
to accounts. The signature covers the raw body, so bodies are read raw and parsed here.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mailslot.api.auth import PRINCIPAL_KEY, ServicesDep
from mailslot.api.errors import ApiError
from mailslot.api.media_common import attachment_service, base_url
from mailslot.services.groups import SignedRequest

router = APIRouter(tags=["groups"])

_JSON_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed request, or account credentials present"},
    401: {"description": "missing, malformed, stale, replayed or wrong Group-Auth"},
    403: {"description": "refused; the body names the action"},
    404: {"description": "no such group"},
}


def _group_id(text: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "bad_request", "groupId: must be base64url of 32 bytes") from exc
    if len(raw) != 32 or "=" in text:
        raise ApiError(400, "bad_request", "groupId: must be base64url of 32 bytes, without padding")
    return raw


async def _signed(request: Request, group_id: str) -> SignedRequest:
    if "authorization" in request.headers or request.scope.get(PRINCIPAL_KEY) is not None:
        raise ApiError(400, "credentials_not_allowed",
                       "group requests must not carry account credentials (use Group-Auth only)")
    query = request.scope.get("query_string", b"").decode("ascii", "replace")
    path = request.scope["path"] + (f"?{query}" if query else "")
    return SignedRequest(_group_id(group_id), request.method, path, await request.body(),
                         request.headers.get("group-auth"))


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "bad_request", "the body must be JSON") from exc


@router.put("/v1/groups/{group_id}", openapi_extra=_JSON_BODY, responses={**_ERRORS, 409: {}})
async def create_group(group_id: str, request: Request, svc: ServicesDep) -> JSONResponse:
    signed = await _signed(request, group_id)
    document = _json(signed.body)
    return JSONResponse(await svc.groups.create(signed, document))


@router.get("/v1/groups/{group_id}", responses=_ERRORS)
async def get_group(group_id: str, request: Request, svc: ServicesDep) -> JSONResponse:
    return JSONResponse(await svc.groups.get(await _signed(request, group_id)))


@router.get("/v1/groups/{group_id}/logs/{from_revision}", responses=_ERRORS)
async def group_logs(group_id: str, from_revision: int, request: Request, svc: ServicesDep) -> JSONResponse:
    if from_revision < 0:
        raise ApiError(400, "bad_request", "fromRevision: must not be negative")
    return JSONResponse(await svc.groups.logs(await _signed(request, group_id), from_revision))


@router.patch("/v1/groups/{group_id}", openapi_extra=_JSON_BODY,
              responses={**_ERRORS, 409: {"description": "stale revision; the body gives the current one"}})
async def change_group(group_id: str, request: Request, svc: ServicesDep) -> JSONResponse:
    signed = await _signed(request, group_id)
    change = _json(signed.body)
    return JSONResponse(await svc.groups.patch(signed, change))


@router.get("/v1/groups/{group_id}/avatar/form", responses={**_ERRORS, 429: {}})
async def group_avatar_form(group_id: str, request: Request, svc: ServicesDep) -> JSONResponse:
    """An upload form for the group's encrypted avatar, authorised by Group-Auth: an account-authorised
    attachment form would tie the uploader's account to the group."""
    signed = await _signed(request, group_id)
    await svc.groups.authorize_attribute_change(signed)
    service = attachment_service(svc)
    return JSONResponse(await service.group_avatar_form(signed.group_id,
                                                        base_url(request, service.settings.upload_url)))


@router.post("/v1/groups/{group_id}/join", openapi_extra=_JSON_BODY, responses={**_ERRORS, 409: {}})
async def join_group(group_id: str, request: Request, svc: ServicesDep) -> JSONResponse:
    signed = await _signed(request, group_id)
    return JSONResponse(await svc.groups.join(signed, _json(signed.body)))
