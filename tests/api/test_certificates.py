"""Sealed-sender delivery certificates (digest §7.1, §7.2) and their keys, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mailslot.app import create_app
from mailslot.crypto import xeddsa
from mailslot.crypto.certificates import parse_fields
from mailslot.sealed_sender_setup import GENERATED_FILE, ConfigError, create_root, create_server
from tests.api.foundation_support import custom_client, services
from tests.conftest import make_settings
from tests.helpers import basic, register

NUMBER = "+15555550051"
DAY_MS = 86_400_000


def single(fields: dict[int, list[bytes | int]], number: int) -> Any:
    values = fields[number]
    assert len(values) == 1, (number, values)
    return values[0]


def decode_sender_certificate(certificate: bytes, trust_root: bytes) -> dict[str, Any]:
    """Decode and check a SenderCertificate the way libsignal's ``validate(trustRoot, now)`` does."""
    outer = parse_fields(certificate)
    assert set(outer) == {1, 2}
    inner_bytes, signature = single(outer, 1), single(outer, 2)
    inner = parse_fields(inner_bytes)
    server = parse_fields(single(inner, 5))
    assert set(server) == {1, 2}
    server_inner_bytes = single(server, 1)
    server_inner = parse_fields(server_inner_bytes)
    server_id, server_key = single(server_inner, 1), single(server_inner, 2)
    assert xeddsa.verify(trust_root, server_inner_bytes, single(server, 2)), "server certificate not signed by root"
    assert server_id != 0xDEADC357
    assert len(server_key) == 33 and server_key[0] == 0x05
    assert xeddsa.verify(server_key, inner_bytes, signature), "sender certificate not signed by the server key"
    assert 6 not in inner and 8 not in inner  # the 16-byte UUID, and the full signer, never only its id
    return {
        "e164": inner[1][0].decode() if 1 in inner else None,
        "device": single(inner, 2),
        "expires": single(inner, 3),
        "identity_key": single(inner, 4),
        "uuid": single(inner, 7),
        "server_id": server_id,
        "server_key": server_key,
        "inner": inner_bytes,
        "signature": signature,
    }


def get_certificate(client: TestClient, headers: dict[str, str], query: str = "") -> bytes:
    response = client.get(f"/v1/certificate/delivery{query}", headers=headers)
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"certificate"}
    return base64.b64decode(response.json()["certificate"], validate=True)


def trust_root_of(client: TestClient) -> bytes:
    root = services(client).trust_root
    assert root is not None
    return base64.b64decode(root)


def test_delivery_certificate_contents(client: TestClient) -> None:
    account = register(client, NUMBER)
    before = int(time.time() * 1000)
    certificate = get_certificate(client, account.auth)
    after = int(time.time() * 1000)
    decoded = decode_sender_certificate(certificate, trust_root_of(client))
    assert decoded["e164"] == NUMBER  # includeE164 defaults to true
    assert decoded["uuid"] == uuid.UUID(account.aci).bytes and len(decoded["uuid"]) == 16
    assert decoded["device"] == 1
    assert decoded["identity_key"] == account.aci_identity.public
    assert before + 7 * DAY_MS <= decoded["expires"] <= after + 7 * DAY_MS
    # the checks above are not vacuous: another root, or a changed byte, fails them
    with pytest.raises(AssertionError):
        decode_sender_certificate(certificate, xeddsa.generate_keypair()[1])
    tampered = bytearray(decoded["inner"])
    tampered[-1] ^= 1
    assert not xeddsa.verify(decoded["server_key"], bytes(tampered), decoded["signature"])


def test_include_e164_flag(client: TestClient) -> None:
    account = register(client, NUMBER)
    root = trust_root_of(client)
    without = decode_sender_certificate(get_certificate(client, account.auth, "?includeE164=false"), root)
    assert without["e164"] is None
    assert without["uuid"] == uuid.UUID(account.aci).bytes
    with_number = decode_sender_certificate(get_certificate(client, account.auth, "?includeE164=true"), root)
    assert with_number["e164"] == NUMBER
    assert client.get("/v1/certificate/delivery?includeE164=maybe", headers=account.auth).status_code == 422


def test_delivery_certificate_requires_credentials(client: TestClient) -> None:
    account = register(client, NUMBER)
    assert client.get("/v1/certificate/delivery").status_code == 401
    assert client.get("/v1/certificate/delivery", headers=basic(f"{account.aci}.1", "wrong")).status_code == 401
    uak = {"Unidentified-Access-Key": base64.b64encode(account.uak).decode()}
    assert client.get("/v1/certificate/delivery", headers=uak).status_code == 401


def _configured(root_private: bytes, ids: list[int]) -> list[dict[str, Any]]:
    return [create_server(root_private, key_id) for key_id in ids]


def test_configured_keys_newest_signs(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    root = create_root()
    root_private = base64.b64decode(root["privateKey"])
    server_keys = _configured(root_private, [3, 12, 7])
    sealed = {"trust_root": root["publicKey"], "server_keys": server_keys, "certificate_days": 2}
    with custom_client(backend, tmp_path, request, sealed_sender=sealed) as client:
        assert services(client).trust_root == root["publicKey"]
        account = register(client, NUMBER)
        before = int(time.time() * 1000)
        decoded = decode_sender_certificate(get_certificate(client, account.auth),
                                            base64.b64decode(root["publicKey"]))
    newest = next(k for k in server_keys if k["id"] == 12)
    newest_public = xeddsa.public_key_from_private(base64.b64decode(newest["private_key"]))
    assert decoded["server_id"] == 12 and decoded["server_key"] == newest_public
    assert before + 2 * DAY_MS - 5000 <= decoded["expires"] <= before + 2 * DAY_MS + 5000
    # no file is generated when keys are configured
    assert not (tmp_path / GENERATED_FILE).exists()


def test_startup_refuses_mismatched_keys(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    root, other_root = create_root(), create_root()
    good = create_server(base64.b64decode(root["privateKey"]), 1)
    foreign = create_server(base64.b64decode(other_root["privateKey"]), 2)
    swapped = {**create_server(base64.b64decode(root["privateKey"]), 3), "private_key": good["private_key"]}
    for server_keys in ([good, foreign], [good, swapped]):
        settings = make_settings(backend, tmp_path, request,
                                 sealed_sender={"trust_root": root["publicKey"], "server_keys": server_keys})
        with pytest.raises(ConfigError), TestClient(create_app(settings)):
            pass


def test_embedded_default_keys_are_generated_once(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with custom_client(backend, tmp_path, request) as client:
        first_root = services(client).trust_root
        account = register(client, NUMBER)
        first = decode_sender_certificate(get_certificate(client, account.auth), trust_root_of(client))
    generated = tmp_path / GENERATED_FILE
    assert generated.exists() and generated.stat().st_mode & 0o777 == 0o600
    content = generated.read_text()
    with custom_client(backend, tmp_path, request) as client:  # a restart on the same data_dir
        assert services(client).trust_root == first_root
        account = register(client, NUMBER)
        second = decode_sender_certificate(get_certificate(client, account.auth),
                                           base64.b64decode(first_root or ""))
    assert second["server_key"] == first["server_key"] and second["server_id"] == first["server_id"]
    assert generated.read_text() == content


def _serve_ready_line(config: Path, cwd: Path) -> dict[str, Any]:
    """Run the real `mailslot serve` until its READY line, then stop it."""
    proc = subprocess.Popen([sys.executable, "-m", "mailslot", "serve", "--config", str(config)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("READY "):
                ready: dict[str, Any] = json.loads(line[len("READY "):])
                return ready
        raise AssertionError("no READY line")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


def test_ready_line_trust_root_is_generated_once(tmp_path: Path) -> None:
    config = tmp_path / "mailslot.toml"
    config.write_text(f'[server]\nport = 0\n[storage]\nurl = "sqlite:///{tmp_path}/db.sqlite"\n'
                      f'data_dir = "{tmp_path}/data"\n')
    first = _serve_ready_line(config, tmp_path)
    generated = json.loads((tmp_path / "data" / GENERATED_FILE).read_text())
    assert first["trustRoot"] == generated["trustRoot"]["publicKey"]
    root = base64.b64decode(first["trustRoot"])
    server_certificate = base64.b64decode(generated["serverKeys"][0]["certificate"])
    inner = parse_fields(server_certificate)
    assert xeddsa.verify(root, inner[1][0], inner[2][0])  # type: ignore[arg-type]
    assert _serve_ready_line(config, tmp_path)["trustRoot"] == first["trustRoot"]
