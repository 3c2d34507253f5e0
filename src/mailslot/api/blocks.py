"""Blocking identified senders (GROUPS.md "Blocking"): ``PUT``/``DELETE /v1/accounts/blocks/{serviceId}``.

There is no listing: the server keeps only HMAC tokens; the account's devices keep the readable list.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from mailslot.api.auth import PrincipalDep, ServicesDep

router = APIRouter(tags=["accounts"])

_RESPONSES: dict[int | str, dict[str, str]] = {
    400: {"description": "not a service id"}, 401: {"description": "missing or invalid credentials"},
}


@router.put("/v1/accounts/blocks/{service_id}", status_code=204, responses=_RESPONSES)
async def block(service_id: str, principal: PrincipalDep, svc: ServicesDep) -> Response:
    await svc.blocks.block(principal, service_id)
    return Response(status_code=204)


@router.delete("/v1/accounts/blocks/{service_id}", status_code=204, responses=_RESPONSES)
async def unblock(service_id: str, principal: PrincipalDep, svc: ServicesDep) -> Response:
    await svc.blocks.unblock(principal, service_id)
    return Response(status_code=204)
