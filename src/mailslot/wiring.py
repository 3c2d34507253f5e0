"""Composition root: builds backends and services from settings (the one place that knows both)."""

from __future__ import annotations

import base64
import ipaddress
import secrets
from pathlib import Path
from typing import TypeVar

from mailslot.backends.memory.account_cache import CachedAccountStore
from mailslot.backends.memory.ratelimit import MemoryRateLimitBackend
from mailslot.backends.memory.replay import MemoryReplayCache
from mailslot.backends.redis.cluster import open_cluster
from mailslot.config import DeliverySettings, Settings
from mailslot.crypto.atrest import AtRestKeyring, keyring_from_config
from mailslot.sealed_sender_setup import load_keys
from mailslot.secretfiles import create_once
from mailslot.services.accounts import AccountService
from mailslot.services.blocks import BlockService
from mailslot.services.certificates import CertificateService
from mailslot.services.container import Services
from mailslot.services.credentials import Authenticator, TokenService
from mailslot.services.delivery import DeliveryService
from mailslot.services.devices import DeviceService, ProvisioningRegistry
from mailslot.services.groups import GroupService
from mailslot.services.keys import KeyService
from mailslot.services.presence import LocalPresence
from mailslot.services.ratelimit import RateLimiters
from mailslot.services.sms import build_sender
from mailslot.services.verification import VerificationService
from mailslot.storage_setup import open_storage
from mailslot.wiring_media import add_media

T = TypeVar("T")
BLOCK_CACHE_SECONDS = 30.0


def _secret_file(data_dir: Path, name: str, nbytes: int = 32) -> bytes:
    """A secret generated on first start and kept in the data directory (mode 0600)."""
    value = create_once(data_dir / name, secrets.token_bytes(nbytes).hex().encode())
    return bytes.fromhex(value.decode().strip())


def load_keyring(settings: DeliverySettings, data_dir: Path) -> AtRestKeyring:
    """The configured at-rest keys, or for the embedded default one key generated into data_dir."""
    if settings.at_rest_keys:
        return keyring_from_config(settings.at_rest_keys, settings.at_rest_current or None)
    key = _secret_file(data_dir, "at_rest.key")
    return AtRestKeyring({1: key}, 1)


def _require(store: T | None, name: str) -> T:
    if store is None:
        raise RuntimeError(f"the configured storage has no {name} store")
    return store


def parse_networks(entries: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(entry, strict=False) for entry in entries]


async def build_services(settings: Settings, run_migrations: bool = True) -> Services:
    storage = await open_storage(settings.storage, run_migrations)
    data_dir = Path(settings.storage.data_dir)
    jwt_secret = (
        settings.auth.jwt_secret.encode() if settings.auth.jwt_secret else _secret_file(data_dir, "jwt.secret")
    )
    cluster = await open_cluster(settings.cluster) if settings.cluster.redis_url else None
    limiters = RateLimiters(cluster.rate_limits if cluster else MemoryRateLimitBackend(), settings.rate_limits)
    sender = build_sender(settings.registration)
    verification = VerificationService(storage.sessions, sender, limiters, settings.registration)
    account_store = CachedAccountStore(storage.accounts, settings.storage.account_cache_seconds)
    if cluster is not None:
        cluster.share_cache("accounts", account_store)
    accounts = AccountService(account_store, verification, limiters)
    try:
        sealed = load_keys(settings.sealed_sender, data_dir)
    except Exception:
        await storage.close()
        if cluster is not None:
            await cluster.close()
        raise
    certificates = CertificateService(
        sealed.trust_root, sealed.signer, sealed.signer_private_key, settings.sealed_sender.certificate_days
    )
    tokens = TokenService(
        jwt_secret, storage.refresh_tokens, settings.auth.access_token_seconds, settings.auth.refresh_token_seconds
    )
    link_secret = (
        settings.auth.link_secret.encode() if settings.auth.link_secret else _secret_file(data_dir, "link.secret")
    )
    delivery = DeliveryService(
        account_store, storage.messages, limiters, load_keyring(settings.delivery, data_dir), settings.delivery,
        cluster.presence if cluster else LocalPresence(),
    )
    accounts.disconnect_listeners.append(delivery.disconnect)
    # Every block and unblock clears the cached list (on every node, through the bus in a cluster), so the
    # lifetime only bounds how long a change made while Redis was unreachable can go unseen elsewhere.
    blocks = BlockService(_require(storage.blocks, "blocks"), delivery.keyring, BLOCK_CACHE_SECONDS)
    delivery.blocks = blocks
    if cluster is not None:
        cluster.share_cache_awaited("blocks", blocks)
    services = Services(
        settings=settings,
        limiters=limiters,
        verification=verification,
        accounts=accounts,
        tokens=tokens,
        authenticator=Authenticator(accounts, tokens),
        keys=KeyService(account_store, storage.keys, limiters),
        certificates=certificates,
        delivery=delivery,
        devices=DeviceService(
            account_store, accounts, limiters, link_secret, cluster.link_waits if cluster else None
        ),
        provisioning=cluster.provisioning if cluster else ProvisioningRegistry(),
        blocks=blocks,
        groups=GroupService(
            _require(storage.groups, "groups"),
            cluster.replay if cluster else MemoryReplayCache(),
            settings.groups.max_members,
        ),
        trusted_proxies=parse_networks(settings.server.trusted_proxies),
        trust_root=base64.b64encode(sealed.trust_root).decode(),
    )
    add_media(services, storage, settings, data_dir, _secret_file)
    services.retention.purges.update(storage.purges)
    services.readiness_checks.update(storage.pings)
    services.closers.append(storage.close)
    if cluster is not None:
        services.readiness_checks["redis"] = cluster.bus.ping
        services.closers.append(cluster.close)
    services.closers.append(sender.close)
    return services
