"""Loading (or, for the embedded default, generating) the sealed-sender trust root and server keys."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailslot.config import SealedSenderSettings
from mailslot.crypto import xeddsa
from mailslot.crypto.certificates import REVOKED_SERVER_KEY_IDS, ServerCertificate
from mailslot.secretfiles import create_once

GENERATED_FILE = "sealed_sender.json"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class SealedSenderKeys:
    trust_root: bytes
    signer: ServerCertificate
    signer_private_key: bytes
    all_certificates: tuple[ServerCertificate, ...]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _decode(value: str, what: str) -> bytes:
    try:
        return base64.b64decode("".join(value.split()), validate=True)  # whitespace: wrapped TOML strings
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"[sealed_sender] {what} is not valid base64") from exc


def create_root() -> dict[str, str]:
    private, public = xeddsa.generate_keypair()
    return {"publicKey": _b64(public), "privateKey": _b64(private)}


def create_server(root_private_key: bytes, key_id: int) -> dict[str, str | int]:
    private, public = xeddsa.generate_keypair()
    certificate = ServerCertificate.create(root_private_key, key_id, public)
    return {"id": key_id, "certificate": _b64(certificate.serialized), "private_key": _b64(private)}


def load_keys(settings: SealedSenderSettings, data_dir: Path) -> SealedSenderKeys:
    if settings.server_keys:
        if not settings.trust_root:
            raise ConfigError("[sealed_sender] trust_root is required when server_keys are configured")
        entries = [(k.id, k.certificate, k.private_key) for k in settings.server_keys]
        trust_root = _decode(settings.trust_root, "trust_root")
    else:
        if settings.trust_root:
            raise ConfigError("[sealed_sender] server_keys are required when trust_root is configured "
                              "(create them with `mailslot certificate create-server`)")
        generated = _generated(data_dir)
        trust_root = base64.b64decode(generated["trustRoot"]["publicKey"])
        entries = [(k["id"], k["certificate"], k["private_key"]) for k in generated["serverKeys"]]
    if len(trust_root) != 33 or trust_root[0] != 0x05:
        raise ConfigError("[sealed_sender] trust_root must be a base64 33-byte Curve25519 public key")
    certificates: list[tuple[ServerCertificate, bytes]] = []
    for key_id, certificate_b64, private_b64 in entries:
        if key_id in REVOKED_SERVER_KEY_IDS:
            # libsignal refuses every certificate signed under a revoked id.
            raise ConfigError(f"server key {key_id}: this id is revoked in libsignal; use another")
        if any(c.key_id == key_id for c, _ in certificates):
            raise ConfigError(f"server key {key_id}: the id is configured more than once")
        serialized = _decode(certificate_b64, f"server key {key_id} certificate")
        try:
            certificate = ServerCertificate.parse(serialized, trust_root)
        except ValueError as exc:
            raise ConfigError(f"server key {key_id}: {exc}") from exc
        private = _decode(private_b64, f"server key {key_id} private_key")
        if len(private) != 32:
            raise ConfigError(f"server key {key_id}: private_key must be 32 bytes")
        if certificate.key_id != key_id or xeddsa.public_key_from_private(private) != certificate.public_key:
            raise ConfigError(f"server key {key_id}: private key or id does not match its certificate")
        certificates.append((certificate, private))
    signer, signer_private = max(certificates, key=lambda item: item[0].key_id)
    return SealedSenderKeys(trust_root, signer, signer_private, tuple(c for c, _ in certificates))


def _generated(data_dir: Path) -> dict[str, Any]:
    path = data_dir / GENERATED_FILE
    if not path.exists():
        root = create_root()
        server = create_server(base64.b64decode(root["privateKey"]), 1)
        create_once(path, json.dumps({"trustRoot": root, "serverKeys": [server]}, indent=2).encode())
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded
