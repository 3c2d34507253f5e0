"""Certificate encoding (digest §7.2), loading the sealed-sender keys, and `mailslot certificate`."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from mailslot.cli import main
from mailslot.config import SealedSenderSettings
from mailslot.crypto import xeddsa
from mailslot.crypto.certificates import ServerCertificate, parse_fields, sender_certificate
from mailslot.sealed_sender_setup import GENERATED_FILE, ConfigError, create_root, create_server, load_keys

REVOKED = 0xDEADC357


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def root_pair() -> tuple[bytes, bytes]:
    root = create_root()
    return base64.b64decode(root["privateKey"]), base64.b64decode(root["publicKey"])


def raw_server_certificate(root_private: bytes, key_id: int, public: bytes) -> bytes:
    """A certificate built by hand (bypassing ServerCertificate.create's own checks)."""
    inner = b"\x08" + _varint(key_id) + b"\x12" + bytes([len(public)]) + public
    signature = xeddsa.sign(root_private, inner)
    return b"\x0a" + _varint(len(inner)) + inner + b"\x12" + bytes([len(signature)]) + signature


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# -- encoding ------------------------------------------------------------------------------------


def test_server_certificate_layout_and_signature() -> None:
    root_private, root_public = root_pair()
    _, server_public = xeddsa.generate_keypair()
    certificate = ServerCertificate.create(root_private, 300, server_public)
    # byte-identical to a hand-built protobuf: field 1 (varint id), field 2 (bytes key), signed by the root
    outer = parse_fields(certificate.serialized)
    inner = outer[1][0]
    assert isinstance(inner, bytes)
    assert inner == b"\x08" + _varint(300) + b"\x12\x21" + server_public
    assert xeddsa.verify(root_public, inner, outer[2][0])  # type: ignore[arg-type]
    parsed = ServerCertificate.parse(certificate.serialized, root_public)
    assert (parsed.key_id, parsed.public_key) == (300, server_public)
    assert ServerCertificate.parse(certificate.serialized).key_id == 300  # no root: parse only
    _, other_root = root_pair()
    with pytest.raises(ValueError, match="trust root"):
        ServerCertificate.parse(certificate.serialized, other_root)


@pytest.mark.parametrize("key_id", [REVOKED, -1, 2**32])
def test_server_certificate_refuses_unusable_ids(key_id: int) -> None:
    root_private, _ = root_pair()
    with pytest.raises(ValueError):
        ServerCertificate.create(root_private, key_id, xeddsa.generate_keypair()[1])


@pytest.mark.parametrize("data", [b"\x0a\x05abc", b"\x08\xff", b"\x09" + bytes(3), b"\x0b"])
def test_parse_fields_rejects_truncated_or_unknown(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_fields(data)


def test_sender_certificate_layout() -> None:
    root_private, root_public = root_pair()
    server_private, server_public = xeddsa.generate_keypair()
    signer = ServerCertificate.create(root_private, 5, server_public)
    _, identity = xeddsa.generate_keypair()
    aci = uuid.uuid4()
    expires = 1_900_000_000_123
    data = sender_certificate(signer, server_private, aci, "+15555550000", 3, identity, expires)
    outer = parse_fields(data)
    inner_bytes, signature = outer[1][0], outer[2][0]
    assert isinstance(inner_bytes, bytes) and isinstance(signature, bytes)
    assert xeddsa.verify(server_public, inner_bytes, signature)
    inner = parse_fields(inner_bytes)
    assert inner == {1: [b"+15555550000"], 2: [3], 3: [expires], 4: [identity], 5: [signer.serialized],
                     7: [aci.bytes]}
    # expires is a fixed64 (wire type 1), not a varint: its key byte is (3 << 3) | 1
    assert b"\x19" + expires.to_bytes(8, "little") in inner_bytes
    without = parse_fields(parse_fields(sender_certificate(signer, server_private, aci, None, 1, identity,
                                                           expires))[1][0])  # type: ignore[arg-type]
    assert 1 not in without and without[7] == [aci.bytes]
    assert ServerCertificate.parse(without[5][0], root_public).key_id == 5  # type: ignore[arg-type]


# -- load_keys -----------------------------------------------------------------------------------


def settings_with(trust_root: str, server_keys: list[dict[str, Any]]) -> SealedSenderSettings:
    return SealedSenderSettings(trust_root=trust_root, server_keys=server_keys)  # type: ignore[arg-type]


def test_configured_keys_newest_id_signs(tmp_path: Path) -> None:
    root_private, root_public = root_pair()
    server_keys = [create_server(root_private, key_id) for key_id in (4, 90, 17)]
    keys = load_keys(settings_with(b64(root_public), server_keys), tmp_path)
    assert keys.trust_root == root_public
    assert keys.signer.key_id == 90
    newest = next(k for k in server_keys if k["id"] == 90)
    assert keys.signer_private_key == base64.b64decode(str(newest["private_key"]))
    assert keys.signer.public_key == xeddsa.public_key_from_private(keys.signer_private_key)
    assert sorted(c.key_id for c in keys.all_certificates) == [4, 17, 90]
    assert not (tmp_path / GENERATED_FILE).exists()


def _mismatches() -> list[Any]:
    root_private, root_public = root_pair()
    other_private, other_public = root_pair()
    good = create_server(root_private, 1)
    other = create_server(root_private, 2)
    revoked_private, revoked_public = xeddsa.generate_keypair()
    revoked = {"id": REVOKED, "certificate": b64(raw_server_certificate(root_private, REVOKED, revoked_public)),
               "private_key": b64(revoked_private)}
    root = b64(root_public)
    cases = [
        ("signed by another root", root, [good, create_server(other_private, 2)]),
        ("configured root is another root", b64(other_public), [good]),
        ("private key of another certificate", root, [good, {**other, "private_key": good["private_key"]}]),
        ("id differs from the certificate's", root, [{**good, "id": 5}]),
        ("private key not 32 bytes", root, [{**good, "private_key": b64(bytes(31))}]),
        ("certificate not base64 protobuf", root, [{**good, "certificate": b64(b"\xff\xff\xff")}]),
        ("duplicate ids", root, [good, create_server(root_private, 1)]),
        ("revoked id", root, [good, revoked]),
        ("root not a 33-byte key", b64(root_public[1:]), [good]),
        ("root not base64", "not base64 at all!", [good]),
        ("server keys without a root", "", [good]),
        ("a root without server keys", root, []),
    ]
    return [pytest.param(root_value, keys, id=name) for name, root_value, keys in cases]


@pytest.mark.parametrize(("trust_root", "server_keys"), _mismatches())
def test_bad_configuration_is_a_config_error(tmp_path: Path, trust_root: str, server_keys: list[Any]) -> None:
    with pytest.raises(ConfigError):
        load_keys(settings_with(trust_root, server_keys), tmp_path)


def test_embedded_default_generated_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = load_keys(SealedSenderSettings(), data_dir)
    path = data_dir / GENERATED_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    second = load_keys(SealedSenderSettings(), data_dir)
    assert second.trust_root == first.trust_root
    assert second.signer == first.signer and second.signer_private_key == first.signer_private_key
    assert ServerCertificate.parse(second.signer.serialized, first.trust_root).key_id == first.signer.key_id
    stored = json.loads(path.read_text())
    assert stored["trustRoot"]["publicKey"] == b64(first.trust_root)
    # another data directory gets another root
    assert load_keys(SealedSenderSettings(), tmp_path / "elsewhere").trust_root != first.trust_root


# -- `mailslot certificate` ----------------------------------------------------------------------


def test_cli_create_root_and_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certificate", "create-root"]) == 0
    root = json.loads(capsys.readouterr().out)
    root_public, root_private = base64.b64decode(root["publicKey"]), base64.b64decode(root["privateKey"])
    assert len(root_public) == 33 and root_public[0] == 0x05 and len(root_private) == 32
    assert xeddsa.public_key_from_private(root_private) == root_public

    assert main(["certificate", "create-server", "--root-key", root["privateKey"], "--key-id", "42"]) == 0
    server = json.loads(capsys.readouterr().out)
    assert server["id"] == 42
    certificate = ServerCertificate.parse(base64.b64decode(server["certificate"]), root_public)
    assert certificate.key_id == 42
    assert xeddsa.public_key_from_private(base64.b64decode(server["private_key"])) == certificate.public_key
    # the output pastes into [sealed_sender] server_keys as is
    keys = load_keys(settings_with(root["publicKey"], [server]), Path("/nonexistent"))
    assert keys.signer.key_id == 42


@pytest.mark.parametrize(
    ("root_key", "key_id"),
    [
        pytest.param("%%%not-base64%%%", "1", id="root-not-base64"),
        pytest.param(b64(bytes(31)), "1", id="root-31-bytes"),
        pytest.param(b64(bytes(33)), "1", id="root-33-bytes"),
        pytest.param(None, str(REVOKED), id="revoked-key-id"),
        pytest.param(None, "-1", id="negative-key-id"),
        pytest.param(None, str(2**32), id="key-id-too-large"),
    ],
)
def test_cli_create_server_refuses(capsys: pytest.CaptureFixture[str], root_key: str | None, key_id: str) -> None:
    if root_key is None:
        root_key = create_root()["privateKey"]
    assert main(["certificate", "create-server", "--root-key", root_key, "--key-id", key_id]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("mailslot: ")
