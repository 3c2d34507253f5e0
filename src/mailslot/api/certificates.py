"""Sealed-sender delivery certificates (digest §7.1)."""

from __future__ import annotations

import base64

from fastapi import APIRouter

from mailslot.api.auth import PrincipalDep, ServicesDep
from mailslot.api.types import WireModel

router = APIRouter(tags=["certificates"])


class DeliveryCertificate(WireModel):
    certificate: str


@router.get("/v1/certificate/delivery", response_model=DeliveryCertificate,
            responses={400: {"description": "includeE164 for an account without a number"}, 401: {}})
async def delivery_certificate(principal: PrincipalDep, svc: ServicesDep, includeE164: bool = True) -> dict[str, str]:
    certificate = svc.certificates.delivery_certificate(principal, includeE164)
    return {"certificate": base64.b64encode(certificate).decode()}
