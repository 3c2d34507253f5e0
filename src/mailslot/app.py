"""The ASGI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from mailslot import __version__
from mailslot.api import accounts, blocks, certificates, devices, groups, keys, messages, misc, registration
from mailslot.api.attachments import router as attachments_router
from mailslot.api.attachments import streams_body
from mailslot.api.errors import install_error_handlers
from mailslot.api.fast import TunnelFastPath
from mailslot.api.profiles import router as profiles_router
from mailslot.config import Settings
from mailslot.observability.middleware import ObservabilityMiddleware
from mailslot.services.container import Services
from mailslot.transport.delivery import DeliveryHooks
from mailslot.transport.provisioning import install_provisioning
from mailslot.transport.websocket import install_websocket
from mailslot.wiring import build_services


def create_app(settings: Settings, services: Services | None = None) -> FastAPI:
    """Build the app. Services are built in the lifespan unless given (tests may pass their own)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = services is None
        app.state.services = services if services is not None else await build_services(settings)
        app.state.services.retention.start()
        try:
            yield
        finally:
            await app.state.services.retention.stop()
            if own:
                await app.state.services.close()

    app = FastAPI(
        title="Mailslot",
        version=__version__,
        description="A self-hostable server for Signal-protocol messaging.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(registration.router)
    app.include_router(accounts.router)
    app.include_router(blocks.router)
    app.include_router(keys.router)
    app.include_router(messages.router)
    app.include_router(devices.router)
    app.include_router(certificates.router)
    app.include_router(groups.router)
    app.include_router(misc.router)
    app.include_router(profiles_router)
    app.include_router(attachments_router)
    install_provisioning(app)
    hooks = DeliveryHooks(app)
    install_websocket(
        app, on_connected=hooks.connected, on_closed=hooks.closed, fast_path=TunnelFastPath(app)
    )
    app.add_middleware(
        ObservabilityMiddleware,
        max_body_bytes=settings.server.max_body_bytes,
        hsts_max_age=settings.tls.hsts_max_age if settings.tls.enabled else None,
        access_log_on=settings.logging.access_log,
        streamed=streams_body,
    )
    return app
