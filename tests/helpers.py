"""Test helpers: keys signed like a libsignal client, and the whole registration flow."""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi.testclient import TestClient

from mailslot.crypto import xeddsa


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + b64(f"{user}:{password}".encode())}


def kem_public_key() -> bytes:
    return b"\x08" + os.urandom(1568)


def signed_key(identity_private: bytes, key_id: int, public: bytes) -> dict[str, Any]:
    return {"keyId": key_id, "publicKey": b64(public), "signature": b64(xeddsa.sign(identity_private, public))}


@dataclass
class Identity:
    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> Identity:
        private, public = xeddsa.generate_keypair()
        return cls(private, public)

    def signed_ec(self, key_id: int = 1) -> dict[str, Any]:
        return signed_key(self.private, key_id, xeddsa.generate_keypair()[1])

    def signed_kem(self, key_id: int = 1) -> dict[str, Any]:
        return signed_key(self.private, key_id, kem_public_key())


@dataclass
class TestAccount:
    __test__ = False  # not a test class, despite its name
    number: str
    password: str
    aci: str
    pni: str
    aci_identity: Identity
    pni_identity: Identity
    uak: bytes
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        return basic(f"{self.aci}.1", self.password)


def registration_body(
    session_id: str | None, aci_identity: Identity, pni_identity: Identity, uak: bytes, **overrides: Any
) -> dict[str, Any]:
    attributes = {
        "fetchesMessages": True,
        "registrationId": 1234,
        "pniRegistrationId": 4321,
        "capabilities": {"spqr": True, "storage": True},
        "unidentifiedAccessKey": b64(uak),
        "unrestrictedUnidentifiedAccess": False,
        "discoverableByPhoneNumber": True,
    }
    attributes.update(overrides.pop("accountAttributes", {}))
    body: dict[str, Any] = {
        "sessionId": session_id,
        "accountAttributes": attributes,
        "skipDeviceTransfer": True,
        "aciIdentityKey": b64(aci_identity.public),
        "pniIdentityKey": b64(pni_identity.public),
        "aciSignedPreKey": aci_identity.signed_ec(1),
        "pniSignedPreKey": pni_identity.signed_ec(2),
        "aciPqLastResortPreKey": aci_identity.signed_kem(3),
        "pniPqLastResortPreKey": pni_identity.signed_kem(4),
    }
    body.update(overrides)
    return body


def verified_session(client: TestClient, number: str, code: str = "123456") -> str:
    response = client.post("/v1/verification/session", json={"number": number})
    assert response.status_code == 200, response.text
    session_id = response.json()["id"]
    response = client.post(f"/v1/verification/session/{session_id}/code", json={"transport": "sms", "client": "x"})
    assert response.status_code == 200, response.text
    response = client.put(f"/v1/verification/session/{session_id}/code", json={"code": code})
    assert response.status_code == 200 and response.json()["verified"], response.text
    return str(session_id)


def register(client: TestClient, number: str = "+15555550001", **overrides: Any) -> TestAccount:
    session_id = verified_session(client, number)
    aci_identity, pni_identity = Identity.generate(), Identity.generate()
    uak = secrets.token_bytes(16)
    password = secrets.token_urlsafe(18)
    body = registration_body(session_id, aci_identity, pni_identity, uak, **overrides)
    response = client.post("/v1/registration", json=body, headers=basic(number, password))
    assert response.status_code == 200, response.text
    data = response.json()
    return TestAccount(number, password, data["uuid"], data["pni"], aci_identity, pni_identity, uak,
                       extra={"response": data})
