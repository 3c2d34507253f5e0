"""Auth dependencies. One rule for both transports: over a WebSocket the socket's principal counts and
inner ``Authorization`` headers are ignored; over HTTP the ``Authorization`` header counts."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from fastapi import Depends, Request

from mailslot.api.errors import ApiError, unauthorized
from mailslot.services.container import Services
from mailslot.services.credentials import Principal

TUNNEL_KEY = "mailslot.tunnel"
PRINCIPAL_KEY = "mailslot.principal"


async def services(request: Request) -> Services:
    # async on purpose: FastAPI runs plain-def dependencies in a thread pool, one hop per request.
    svc: Services = request.app.state.services
    return svc


def _services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


async def _socket_principal(request: Request) -> Principal | None:
    """The socket's principal, re-read for this request.

    A socket lives for hours: the account may have been deleted, re-registered (new credentials) or
    locked since the upgrade, and its attributes may have changed. Until sockets are closed with 4401
    on such changes, each tunnelled request checks that the device and its credential still stand.
    """
    principal: Principal | None = request.scope.get(PRINCIPAL_KEY)
    if principal is None:
        return None
    account = await _services(request).accounts.get_by_aci(principal.aci)
    device = account.device(principal.device_id) if account else None
    if account is None or device is None or device.auth_hash != principal.device.auth_hash:
        return None
    return Principal(account, device)


async def optional_principal(request: Request) -> Principal | None:
    if request.scope.get(TUNNEL_KEY):
        return await _socket_principal(request)
    header = request.headers.get("authorization")
    if not header:
        return None
    return await _services(request).authenticator.authenticate_header(header)


async def require_principal(request: Request) -> Principal:
    principal = await optional_principal(request)
    if principal is None:
        raise unauthorized()
    return principal


async def require_primary(principal: Annotated[Principal, Depends(require_principal)]) -> Principal:
    if not principal.device.is_primary:
        raise ApiError(403, "primary_required", "only the primary device may do this")
    return principal


def is_authenticated_request(request: Request) -> bool:
    if request.scope.get(TUNNEL_KEY):
        return request.scope.get(PRINCIPAL_KEY) is not None
    return "authorization" in request.headers


def client_ip(request: Request) -> str:
    """The peer address, or the nearest untrusted ``X-Forwarded-For`` hop when the peer is a trusted proxy."""
    peer = request.client.host if request.client else "0.0.0.0"  # noqa: S104 - a placeholder, not a bind
    trusted = _services(request).trusted_proxies
    if not trusted or not _in(peer, trusted):
        return peer
    forwarded = request.headers.get("x-forwarded-for", "")
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _in(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return any(ip in net for net in networks)


PrincipalDep = Annotated[Principal, Depends(require_principal)]
PrimaryDep = Annotated[Principal, Depends(require_primary)]
OptionalPrincipalDep = Annotated[Principal | None, Depends(optional_principal)]
ServicesDep = Annotated[Services, Depends(services)]
