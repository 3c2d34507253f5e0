"""The ``mailslot`` command: ``serve``, ``migrate`` (and the operator tools of later issues)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import socket
import ssl
import sys
from collections.abc import Sequence

import uvicorn

from mailslot.app import create_app
from mailslot.backends.sql.database import Database
from mailslot.backends.sql.migrations import migrate
from mailslot.config import Settings, load_settings
from mailslot.observability.logging import configure_logging
from mailslot.sealed_sender_setup import create_root, create_server

log = logging.getLogger("mailslot.cli")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


async def _serve(settings: Settings) -> None:
    app = create_app(settings)
    sock = _bind(settings.server.host, settings.server.port)
    port = sock.getsockname()[1]
    tls = settings.tls.enabled
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        access_log=False,
        proxy_headers=False,  # X-Forwarded-For is honoured only from [server] trusted_proxies, by us
        server_header=False,
        ws_max_size=settings.websocket.max_frame_bytes * 2 + 1024,
        ssl_certfile=settings.tls.cert_file or None,
        ssl_keyfile=settings.tls.key_file or None,
        timeout_graceful_shutdown=10,
    )
    config.load()
    if tls and config.ssl is not None:
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_3
    server = uvicorn.Server(config)

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.02)
        services = app.state.services
        ready = {"host": settings.server.host, "port": port, "tls": tls, "trustRoot": services.trust_root}
        sys.stdout.write("READY " + json.dumps(ready) + "\n")
        sys.stdout.flush()

    announcer = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        announcer.cancel()
    if not server.started:
        raise SystemExit(1)


async def _migrate(settings: Settings) -> None:
    """Every configured database: the one at ``url``, or each shard of ``urls``."""
    from mailslot.backends.sharding.stores import shard_settings

    targets = [shard_settings(settings.storage, url) for url in settings.storage.urls] or [settings.storage]
    applied: list[list[int]] = []
    for target in targets:
        db = Database.from_settings(target)
        try:
            applied.append(await migrate(db.engine))
        finally:
            await db.close()
    print(json.dumps({"applied": applied[0]} if len(applied) == 1 else {"applied": applied}))


def _run(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def _certificate(args: argparse.Namespace) -> int:
    """Print keys as JSON; `create-server` output pastes into `[sealed_sender] server_keys`."""
    if args.certificate_command == "create-root":
        print(json.dumps(create_root()))
        return 0
    try:
        root_key = base64.b64decode(args.root_key, validate=True)
        if len(root_key) != 32:
            raise ValueError("the root key must be 32 bytes")
        print(json.dumps(create_server(root_key, args.key_id)))
    except (ValueError, binascii.Error) as exc:
        print(f"mailslot: {exc}", file=sys.stderr)
        return 2
    return 0


async def _shards(settings: Settings, args: argparse.Namespace) -> None:
    from mailslot.backends.sharding.rebalance import rebalance

    await rebalance(settings.storage, dry_run=args.dry_run, out=lambda line: print(line, flush=True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailslot", description="Mailslot messaging server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    mig = sub.add_parser("migrate", help="apply schema migrations")
    mig.add_argument("--config", help="TOML configuration file")
    cert = sub.add_parser("certificate", help="sealed-sender trust root and server certificates")
    cert_sub = cert.add_subparsers(dest="certificate_command", required=True)
    cert_sub.add_parser("create-root", help="generate a trust-root key pair (keep the private key offline)")
    server_cert = cert_sub.add_parser("create-server", help="generate a server key and certificate")
    server_cert.add_argument("--root-key", required=True, help="base64 32-byte trust-root private key")
    server_cert.add_argument("--key-id", required=True, type=int, help="the new server key's id")
    shards = sub.add_parser("shards", help="sharded storage ([storage] urls)")
    shards_sub = shards.add_subparsers(dest="shards_command", required=True)
    reb = shards_sub.add_parser(
        "rebalance", help="move rows to the shards the ring now assigns (stop every node first)"
    )
    reb.add_argument("--config", help="TOML configuration file")
    reb.add_argument("--dry-run", action="store_true", help="only count what would move")
    args = parser.parse_args(argv)

    if args.command == "certificate":
        return _certificate(args)

    try:
        settings = load_settings(args.config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"mailslot: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "host", None):
        settings.server.host = args.host
    if getattr(args, "port", None) is not None:
        settings.server.port = args.port
    configure_logging(settings.logging.level)

    if args.command == "serve":
        _run(_serve(settings))
    elif args.command == "migrate":
        _run(_migrate(settings))
    elif args.command == "shards":
        if not settings.storage.urls:
            print("mailslot: [storage] urls is empty: there are no shards", file=sys.stderr)
            return 2
        _run(_shards(settings, args))
    return 0
