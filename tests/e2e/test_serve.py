"""The real `mailslot serve` process: READY line, TLS 1.3 only with HSTS, migrate, config errors."""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MAILSLOT = [sys.executable, "-m", "mailslot"]


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _start(config: Path, cwd: Path) -> tuple[subprocess.Popen[str], dict[str, object]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*MAILSLOT, "serve", "--config", str(config)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("READY "):
            return proc, json.loads(line[len("READY "):])
    proc.wait(timeout=5)
    raise AssertionError(f"no READY line; stderr: {proc.stderr.read() if proc.stderr else ''}")


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[dict[str, object], Path]]:
    cert, key = _self_signed(tmp_path)
    config = tmp_path / "mailslot.toml"
    config.write_text(
        f'[server]\nport = 0\n[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n'
        f'[storage]\nurl = "sqlite:///{tmp_path}/db.sqlite"\ndata_dir = "{tmp_path}/data"\n'
    )
    proc, ready = _start(config, tmp_path)
    try:
        yield ready, cert
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


def test_ready_line_and_tls13_with_hsts(tls_server: tuple[dict[str, object], Path]) -> None:
    ready, cert = tls_server
    assert ready["tls"] is True and ready["host"] == "127.0.0.1"
    trust_root = base64.b64decode(str(ready["trustRoot"]))
    assert len(trust_root) == 33 and trust_root[0] == 0x05
    context = ssl.create_default_context(cafile=str(cert))
    conn = http.client.HTTPSConnection("localhost", int(str(ready["port"])), context=context, timeout=10)
    conn.request("GET", "/health/live")
    response = conn.getresponse()
    assert response.status == 200
    assert "max-age=" in (response.getheader("strict-transport-security") or "")
    assert conn.sock is not None and conn.sock.version() == "TLSv1.3"  # type: ignore[attr-defined]
    conn.close()


def test_tls12_client_is_refused(tls_server: tuple[dict[str, object], Path]) -> None:
    ready, cert = tls_server
    context = ssl.create_default_context(cafile=str(cert))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    conn = http.client.HTTPSConnection("localhost", int(str(ready["port"])), context=context, timeout=10)
    with pytest.raises(ssl.SSLError):
        conn.request("GET", "/health/live")
    conn.close()


def test_migrate_command_and_missing_config(tmp_path: Path) -> None:
    config = tmp_path / "m.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/db.sqlite"\n')
    first = subprocess.run([*MAILSLOT, "migrate", "--config", str(config)], capture_output=True, text=True,
                           check=True)
    from mailslot.backends.sql.migrations import MIGRATIONS

    assert json.loads(first.stdout)["applied"] == [version for version, _, _ in MIGRATIONS]
    second = subprocess.run([*MAILSLOT, "migrate", "--config", str(config)], capture_output=True, text=True,
                            check=True)
    assert json.loads(second.stdout)["applied"] == []
    missing = subprocess.run([*MAILSLOT, "serve", "--config", str(tmp_path / "nope.toml")], capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailslot.config import load_settings

    config = tmp_path / "c.toml"
    config.write_text('[server]\nport = 9000\nhost = "127.0.0.2"\n')
    monkeypatch.setenv("MAILSLOT_SERVER__PORT", "9100")
    settings = load_settings(config)
    assert settings.server.port == 9100 and settings.server.host == "127.0.0.2"
