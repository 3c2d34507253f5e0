"""Keepalive, remote config, health and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mailslot.api.auth import ServicesDep
from mailslot.observability.metrics import DEPENDENCY_UP, REGISTRY

router = APIRouter()


@router.get("/v1/keepalive", tags=["websocket"])
async def keepalive() -> Response:
    return Response(status_code=200)


@router.get("/v2/config", tags=["config"])
async def remote_config(request: Request) -> JSONResponse:
    """Feature flags for clients. Features that need zero-knowledge services are reported off."""
    config: dict[str, Any] = {
        "mailslot.groups": True,
        "mailslot.jwtSessions": True,
        "mailslot.totp": True,
        "global.usernames": False,
        "global.cdsi": False,
        "global.svr": False,
        "global.payments": False,
        "global.backups": False,
    }
    etag = '"mailslot-config-1"'
    if request.headers.get("if-none-match") == etag:
        return JSONResponse(None, status_code=304, headers={"ETag": etag})
    return JSONResponse({"config": config}, headers={"ETag": etag})


@router.get("/health/live", tags=["health"])
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/health/ready", tags=["health"], responses={503: {"description": "a dependency is down"}})
async def ready(svc: ServicesDep) -> JSONResponse:
    checks: dict[str, str] = {}
    healthy = True
    for name, check in svc.readiness_checks.items():
        try:
            await check()
            checks[name] = "ok"
        except Exception:
            checks[name] = "unavailable"
            healthy = False
        DEPENDENCY_UP.labels(name).set(1 if checks[name] == "ok" else 0)
    return JSONResponse({"status": "ok" if healthy else "unavailable", "checks": checks},
                        status_code=200 if healthy else 503)


@router.get("/metrics", tags=["health"], include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
