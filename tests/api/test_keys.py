"""Pre-key endpoints (digest §4, §7.3): uploads, counts, the consistency check and bundle fetches."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

from mailslot.crypto import xeddsa
from tests.api.foundation_support import add_linked_device, custom_client
from tests.helpers import Identity, b64, basic, register, signed_key

if TYPE_CHECKING:
    from tests.helpers import TestAccount

TARGET = "+15555550041"
CALLER = "+15555550042"


# -- helpers -------------------------------------------------------------------------------------


def ec_key(key_id: int) -> dict[str, Any]:
    return {"keyId": key_id, "publicKey": b64(xeddsa.generate_keypair()[1])}


def ec_keys(ids: range | list[int]) -> list[dict[str, Any]]:
    return [ec_key(i) for i in ids]


def kem_keys(identity: Identity, ids: range | list[int]) -> list[dict[str, Any]]:
    return [identity.signed_kem(i) for i in ids]


def unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def put_keys(client: TestClient, account: TestAccount, identity: str = "aci", **body: Any) -> Any:
    return client.put(f"/v2/keys?identity={identity}", json=body, headers=account.auth)


def counts(client: TestClient, account: TestAccount, identity: str = "aci") -> dict[str, int]:
    response = client.get(f"/v2/keys?identity={identity}", headers=account.auth)
    assert response.status_code == 200, response.text
    body: dict[str, int] = response.json()
    return body


def full_upload(identity: Identity, ec_ids: range, kem_ids: range, signed_id: int = 500,
                last_resort_id: int = 900) -> dict[str, Any]:
    return {
        "preKeys": ec_keys(ec_ids),
        "pqPreKeys": kem_keys(identity, kem_ids),
        "signedPreKey": identity.signed_ec(signed_id),
        "pqLastResortPreKey": identity.signed_kem(last_resort_id),
    }


def anon_fetch(client: TestClient, target: TestAccount, device: str = "1", uak: bytes | None = None,
               service_id: str | None = None) -> Any:
    key = target.uak if uak is None else uak
    return client.get(f"/v2/keys/{service_id or target.aci}/{device}",
                      headers={"Unidentified-Access-Key": b64(key)})


def digest(identity_key: bytes, signed: dict[str, Any], last_resort: dict[str, Any]) -> bytes:
    return hashlib.sha256(
        identity_key
        + signed["keyId"].to_bytes(8, "big") + base64.b64decode(signed["publicKey"])
        + last_resort["keyId"].to_bytes(8, "big") + base64.b64decode(last_resort["publicKey"])
    ).digest()


@pytest.fixture
def target(client: TestClient) -> TestAccount:
    return register(client, TARGET)


@pytest.fixture
def caller(client: TestClient) -> TestAccount:
    return register(client, CALLER)


# -- PUT /v2/keys, GET /v2/keys ------------------------------------------------------------------


def test_upload_and_counts_per_identity(client: TestClient, target: TestAccount) -> None:
    assert counts(client, target) == {"count": 0, "pqCount": 0}
    assert counts(client, target, "pni") == {"count": 0, "pqCount": 0}
    response = put_keys(client, target, **full_upload(target.aci_identity, range(1, 6), range(1, 5)))
    assert response.status_code == 204, response.text
    assert response.content == b""
    response = put_keys(client, target, "pni", **full_upload(target.pni_identity, range(1, 4), range(1, 3)))
    assert response.status_code == 204, response.text
    assert counts(client, target) == {"count": 5, "pqCount": 4}
    assert counts(client, target, "pni") == {"count": 3, "pqCount": 2}
    # identity defaults to aci, and is matched case-insensitively
    response = client.get("/v2/keys", headers=target.auth)
    assert response.json() == {"count": 5, "pqCount": 4}
    assert counts(client, target, "PNI") == {"count": 3, "pqCount": 2}
    assert client.get("/v2/keys?identity=xyz", headers=target.auth).status_code == 422


def test_key_endpoints_require_credentials(client: TestClient, target: TestAccount) -> None:
    body = full_upload(target.aci_identity, range(1, 3), range(1, 3))
    wrong = basic(f"{target.aci}.1", "not-the-password")
    for headers in ({}, wrong):
        assert client.put("/v2/keys", json=body, headers=headers).status_code == 401
        assert client.get("/v2/keys", headers=headers).status_code == 401
        check = {"identityType": "aci", "digest": b64(bytes(32))}
        assert client.post("/v2/keys/check", json=check, headers=headers).status_code == 401
    assert counts(client, target) == {"count": 0, "pqCount": 0}


@pytest.mark.parametrize("type_byte", [0x08, 0x0A])
def test_kyber_and_mlkem_keys_accepted(client: TestClient, target: TestAccount, type_byte: int) -> None:
    identity = target.aci_identity
    keys = [signed_key(identity.private, i, bytes([type_byte]) + os.urandom(1568)) for i in range(1, 4)]
    last_resort = signed_key(identity.private, 77, bytes([type_byte]) + os.urandom(1568))
    response = put_keys(client, target, pqPreKeys=keys, pqLastResortPreKey=last_resort)
    assert response.status_code == 204, response.text
    assert counts(client, target)["pqCount"] == 3


@pytest.mark.parametrize(
    "public",
    [
        pytest.param(b"\x07" + bytes(1568), id="kyber768-type-byte"),
        pytest.param(b"\x05" + bytes(1568), id="ec-type-byte"),
        pytest.param(b"\x09" + bytes(1568), id="unknown-type-byte"),
        pytest.param(b"\x08" + bytes(1567), id="too-short"),
        pytest.param(b"\x08" + bytes(1569), id="too-long"),
        pytest.param(b"\x0a" + bytes(1184), id="mlkem768-length"),
        pytest.param(b"", id="empty"),
    ],
)
def test_malformed_kem_keys_refused(client: TestClient, target: TestAccount, public: bytes) -> None:
    # properly signed, so only the format can be the reason for refusing it
    key = signed_key(target.aci_identity.private, 5, public)
    good = kem_keys(target.aci_identity, range(1, 3))
    for body in ({"pqPreKeys": [*good, key]}, {"pqPreKeys": good, "pqLastResortPreKey": key}):
        assert put_keys(client, target, preKeys=ec_keys(range(1, 3)), **body).status_code == 422, body.keys()
    assert counts(client, target) == {"count": 0, "pqCount": 0}


@pytest.mark.parametrize(
    "public",
    [
        pytest.param(b"\x06" + bytes(range(32)), id="wrong-type-byte"),
        pytest.param(b"\x05" + bytes(31), id="too-short"),
        pytest.param(b"\x05" + bytes(33), id="too-long"),
        pytest.param(bytes(range(32)), id="no-type-byte"),
        pytest.param(b"\x08" + bytes(1568), id="kem-key"),
    ],
)
def test_malformed_ec_keys_refused(client: TestClient, target: TestAccount, public: bytes) -> None:
    one_time = {"keyId": 9, "publicKey": b64(public)}
    body = {"preKeys": [*ec_keys(range(1, 4)), one_time], "pqPreKeys": kem_keys(target.aci_identity, range(1, 3))}
    assert put_keys(client, target, **body).status_code == 422
    signed = signed_key(target.aci_identity.private, 9, public)
    assert put_keys(client, target, signedPreKey=signed).status_code == 422
    assert counts(client, target) == {"count": 0, "pqCount": 0}


def test_signatures_checked_against_the_identity_of_the_upload(client: TestClient, target: TestAccount) -> None:
    aci, pni = target.aci_identity, target.pni_identity
    stranger = Identity.generate()
    cases: list[tuple[str, dict[str, Any]]] = [
        ("pni", {"signedPreKey": aci.signed_ec(3)}),  # signed by the ACI identity, uploaded as PNI
        ("pni", {"pqPreKeys": kem_keys(aci, range(1, 3))}),
        ("pni", {"pqLastResortPreKey": aci.signed_kem(4)}),
        ("aci", {"signedPreKey": pni.signed_ec(3)}),
        ("aci", {"pqPreKeys": kem_keys(pni, range(1, 3))}),
        ("aci", {"pqLastResortPreKey": stranger.signed_kem(4)}),
    ]
    for identity, body in cases:
        response = put_keys(client, target, identity, preKeys=ec_keys(range(1, 3)), **body)
        assert response.status_code == 422, (identity, body.keys(), response.text)
    assert counts(client, target) == {"count": 0, "pqCount": 0}
    assert counts(client, target, "pni") == {"count": 0, "pqCount": 0}
    # the same keys signed by the right identity are accepted
    assert put_keys(client, target, "pni", signedPreKey=pni.signed_ec(3), pqPreKeys=kem_keys(pni, range(1, 3)),
                    pqLastResortPreKey=pni.signed_kem(4)).status_code == 204
    assert counts(client, target, "pni") == {"count": 0, "pqCount": 2}


def test_signature_sign_bit_is_checked(client: TestClient, target: TestAccount) -> None:
    """libsignal keeps the Edwards sign bit in the top bit of the last signature byte; flipping it must fail."""
    key = target.aci_identity.signed_kem(7)
    signature = bytearray(base64.b64decode(key["signature"]))
    signature[63] ^= 0x80
    assert put_keys(client, target, pqPreKeys=[{**key, "signature": b64(bytes(signature))}]).status_code == 422
    assert put_keys(client, target, pqPreKeys=[key]).status_code == 204


def test_one_bad_signature_stores_nothing(client: TestClient, target: TestAccount) -> None:
    identity = target.aci_identity
    first = full_upload(identity, range(1, 11), range(1, 11), signed_id=100, last_resort_id=200)
    assert put_keys(client, target, **first).status_code == 204
    id_key = target.aci_identity.public
    old_digest = digest(id_key, first["signedPreKey"], first["pqLastResortPreKey"])

    second = full_upload(identity, range(1000, 1050), range(1000, 1050), signed_id=101, last_resort_id=201)
    bad = second["pqPreKeys"][37]
    bad_signature = bytearray(base64.b64decode(bad["signature"]))
    bad_signature[5] ^= 0x01
    bad["signature"] = b64(bytes(bad_signature))
    response = put_keys(client, target, **second)
    assert response.status_code == 422, response.text

    assert counts(client, target) == {"count": 10, "pqCount": 10}
    check = {"identityType": "aci", "digest": b64(old_digest)}
    assert client.post("/v2/keys/check", json=check, headers=target.auth).status_code == 200
    bundle = anon_fetch(client, target).json()["devices"][0]
    assert bundle["preKey"]["keyId"] == 1 and bundle["pqPreKey"]["keyId"] == 1
    assert bundle["signedPreKey"]["keyId"] == 100


def test_bad_last_resort_signature_stores_nothing(client: TestClient, target: TestAccount) -> None:
    identity = target.aci_identity
    body = full_upload(identity, range(1, 6), range(1, 6))
    body["pqLastResortPreKey"] = {**body["pqLastResortPreKey"], "signature": b64(bytes(64))}
    assert put_keys(client, target, **body).status_code == 422
    assert counts(client, target) == {"count": 0, "pqCount": 0}


def test_at_most_100_keys_per_list(client: TestClient, target: TestAccount) -> None:
    identity = target.aci_identity
    assert put_keys(client, target, preKeys=ec_keys(range(1, 102))).status_code == 422
    assert put_keys(client, target, pqPreKeys=kem_keys(identity, range(1, 102))).status_code == 422
    assert counts(client, target) == {"count": 0, "pqCount": 0}
    assert put_keys(client, target, preKeys=ec_keys(range(1, 101)),
                    pqPreKeys=kem_keys(identity, range(1, 101))).status_code == 204
    assert counts(client, target) == {"count": 100, "pqCount": 100}
    for key_id in (-1, 2**31):
        assert put_keys(client, target, preKeys=[{**ec_key(1), "keyId": key_id}]).status_code == 422
        assert put_keys(client, target, pqPreKeys=[identity.signed_kem(key_id)]).status_code == 422
    assert counts(client, target) == {"count": 100, "pqCount": 100}


def test_duplicate_key_ids_refused(client: TestClient, target: TestAccount) -> None:
    assert put_keys(client, target, preKeys=ec_keys([1, 2, 2])).status_code == 422
    assert put_keys(client, target, pqPreKeys=kem_keys(target.aci_identity, [4, 4])).status_code == 422
    assert counts(client, target) == {"count": 0, "pqCount": 0}


def test_non_empty_list_replaces_absent_list_keeps(client: TestClient, target: TestAccount) -> None:
    identity = target.aci_identity
    assert put_keys(client, target, **full_upload(identity, range(1, 6), range(1, 6))).status_code == 204
    # a new EC list replaces the EC pool; the KEM pool is untouched
    assert put_keys(client, target, preKeys=ec_keys(range(10, 13))).status_code == 204
    assert counts(client, target) == {"count": 3, "pqCount": 5}
    # empty lists and absent lists leave both pools alone
    assert put_keys(client, target, preKeys=[], pqPreKeys=[]).status_code == 204
    assert put_keys(client, target).status_code == 204
    assert counts(client, target) == {"count": 3, "pqCount": 5}
    # a new KEM list replaces the KEM pool
    assert put_keys(client, target, pqPreKeys=kem_keys(identity, range(20, 22))).status_code == 204
    assert counts(client, target) == {"count": 3, "pqCount": 2}
    bundle = anon_fetch(client, target).json()["devices"][0]
    assert bundle["preKey"]["keyId"] == 10
    assert bundle["pqPreKey"]["keyId"] == 20


# -- POST /v2/keys/check -------------------------------------------------------------------------


def test_check_keys_digest(client: TestClient, target: TestAccount) -> None:
    aci, pni = target.aci_identity, target.pni_identity
    aci_body = {"signedPreKey": aci.signed_ec(11), "pqLastResortPreKey": aci.signed_kem(2**31 - 1)}
    pni_body = {"signedPreKey": pni.signed_ec(12), "pqLastResortPreKey": pni.signed_kem(13)}
    assert put_keys(client, target, **aci_body).status_code == 204
    assert put_keys(client, target, "pni", **pni_body).status_code == 204
    aci_digest = digest(aci.public, aci_body["signedPreKey"], aci_body["pqLastResortPreKey"])
    pni_digest = digest(pni.public, pni_body["signedPreKey"], pni_body["pqLastResortPreKey"])

    def check(identity_type: str, value: bytes) -> int:
        body = {"identityType": identity_type, "digest": b64(value)}
        return client.post("/v2/keys/check", json=body, headers=target.auth).status_code

    assert check("aci", aci_digest) == 200
    assert check("pni", pni_digest) == 200
    assert check("aci", pni_digest) == 409
    assert check("pni", aci_digest) == 409
    assert check("aci", bytes(32)) == 409
    # unpadded base64 is accepted on input
    body = {"identityType": "aci", "digest": b64(aci_digest).rstrip("=")}
    assert client.post("/v2/keys/check", json=body, headers=target.auth).status_code == 200
    for wrong_length in (31, 33, 0):
        assert check("aci", aci_digest[:wrong_length] if wrong_length < 32 else aci_digest + b"\0") == 422
    # rotating the signed pre-key makes the old digest stale
    assert put_keys(client, target, signedPreKey=aci.signed_ec(14)).status_code == 204
    assert check("aci", aci_digest) == 409


# -- GET /v2/keys/{serviceId}/{deviceId} ---------------------------------------------------------


def test_authenticated_fetch_returns_and_consumes_keys(
    client: TestClient, target: TestAccount, caller: TestAccount
) -> None:
    identity = target.aci_identity
    upload = full_upload(identity, range(1, 4), range(1, 4), signed_id=500, last_resort_id=900)
    assert put_keys(client, target, **upload).status_code == 204
    response = client.get(f"/v2/keys/{target.aci}/1", headers=caller.auth)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"identityKey", "devices"}
    assert body["identityKey"] == b64(identity.public)
    assert len(body["devices"]) == 1
    device = body["devices"][0]
    assert device["deviceId"] == 1
    assert device["registrationId"] == 1234
    assert device["signedPreKey"]["keyId"] == 500
    assert device["signedPreKey"]["publicKey"] == upload["signedPreKey"]["publicKey"]
    assert unb64(device["signedPreKey"]["signature"]) == base64.b64decode(upload["signedPreKey"]["signature"])
    assert device["preKey"] == upload["preKeys"][0]
    assert device["pqPreKey"]["keyId"] == 1
    assert device["pqPreKey"]["publicKey"] == upload["pqPreKeys"][0]["publicKey"]
    # the returned keys verify against the returned identity key, as a client will check
    identity_key = base64.b64decode(body["identityKey"])
    for key in (device["signedPreKey"], device["pqPreKey"]):
        assert xeddsa.verify(identity_key, base64.b64decode(key["publicKey"]), unb64(key["signature"]))
    assert counts(client, target) == {"count": 2, "pqCount": 2}

    second = client.get(f"/v2/keys/{target.aci}/*", headers=caller.auth).json()["devices"][0]
    assert second["preKey"]["keyId"] == 2 and second["pqPreKey"]["keyId"] == 2
    assert counts(client, target) == {"count": 1, "pqCount": 1}


def test_pni_target_uses_pni_identity_and_pool(
    client: TestClient, target: TestAccount, caller: TestAccount
) -> None:
    assert put_keys(client, target, **full_upload(target.aci_identity, range(1, 3), range(1, 3))).status_code == 204
    pni_upload = full_upload(target.pni_identity, range(50, 53), range(60, 63), signed_id=70, last_resort_id=80)
    assert put_keys(client, target, "pni", **pni_upload).status_code == 204
    response = client.get(f"/v2/keys/PNI:{target.pni}/1", headers=caller.auth)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["identityKey"] == b64(target.pni_identity.public)
    device = body["devices"][0]
    assert device["registrationId"] == 4321  # pniRegistrationId
    assert device["signedPreKey"]["keyId"] == 70
    assert device["preKey"]["keyId"] == 50 and device["pqPreKey"]["keyId"] == 60
    assert counts(client, target, "pni") == {"count": 2, "pqCount": 2}
    assert counts(client, target) == {"count": 2, "pqCount": 2}


def test_last_resort_returned_and_kept_when_one_time_keys_are_gone(client: TestClient, target: TestAccount) -> None:
    identity = target.aci_identity
    upload = full_upload(identity, range(1, 2), range(1, 3), last_resort_id=999)
    assert put_keys(client, target, **upload).status_code == 204
    seen = []
    for _ in range(5):
        response = anon_fetch(client, target)
        assert response.status_code == 200, response.text
        device = response.json()["devices"][0]
        seen.append((device["preKey"]["keyId"] if device["preKey"] else None, device["pqPreKey"]["keyId"]))
    assert seen == [(1, 1), (None, 2), (None, 999), (None, 999), (None, 999)]
    last = client.get(f"/v2/keys/{target.aci}/1", headers=target.auth).json()["devices"][0]["pqPreKey"]
    assert last["publicKey"] == upload["pqLastResortPreKey"]["publicKey"]
    assert counts(client, target) == {"count": 0, "pqCount": 0}


def test_registration_keys_alone_make_a_bundle(client: TestClient, target: TestAccount) -> None:
    response = anon_fetch(client, target)
    assert response.status_code == 200, response.text
    device = response.json()["devices"][0]
    assert device["preKey"] is None
    assert device["signedPreKey"]["keyId"] == 1 and device["pqPreKey"]["keyId"] == 3


def test_unknown_account_404_authenticated_401_anonymous(client: TestClient, caller: TestAccount) -> None:
    unknown = "0d6b6f43-35a1-4ac4-9c51-7c3cfb1d2b5e"
    for service_id in (unknown, f"PNI:{unknown}", "not-a-service-id"):
        assert client.get(f"/v2/keys/{service_id}/1", headers=caller.auth).status_code == 404, service_id
        assert client.get(f"/v2/keys/{service_id}/*", headers=caller.auth).status_code == 404, service_id
        response = client.get(f"/v2/keys/{service_id}/1", headers={"Unidentified-Access-Key": b64(caller.uak)})
        assert response.status_code == 401, service_id
        assert client.get(f"/v2/keys/{service_id}/1").status_code == 401


def test_anonymous_access_key_rules(client: TestClient, target: TestAccount) -> None:
    assert anon_fetch(client, target).status_code == 200
    assert anon_fetch(client, target, "*").status_code == 200
    assert anon_fetch(client, target, uak=secrets.token_bytes(16)).status_code == 401
    flipped = bytes([target.uak[0] ^ 1]) + target.uak[1:]
    assert anon_fetch(client, target, uak=flipped).status_code == 401
    assert anon_fetch(client, target, uak=target.uak[:15]).status_code == 401
    assert anon_fetch(client, target, uak=target.uak + b"\0").status_code == 401
    assert anon_fetch(client, target, uak=b"").status_code == 401
    # padding is optional, as for Java's decoder
    unpadded = {"Unidentified-Access-Key": b64(target.uak).rstrip("=")}
    assert client.get(f"/v2/keys/{target.aci}/1", headers=unpadded).status_code == 200
    bad_header = {"Unidentified-Access-Key": "!!not base64!!"}
    assert client.get(f"/v2/keys/{target.aci}/1", headers=bad_header).status_code == 401
    assert client.get(f"/v2/keys/{target.aci}/1").status_code == 401
    wrong_password = basic(f"{target.aci}.1", "wrong")
    assert client.get(f"/v2/keys/{target.aci}/1", headers=wrong_password).status_code == 401
    # never for PNI targets, even with the right key
    assert anon_fetch(client, target, service_id=f"PNI:{target.pni}").status_code == 401
    assert anon_fetch(client, target, "*", service_id=f"PNI:{target.pni}").status_code == 401


def test_group_send_token_not_combined_and_not_offered(client: TestClient, target: TestAccount) -> None:
    token = {"Group-Send-Token": b64(secrets.token_bytes(64))}
    uak = {"Unidentified-Access-Key": b64(target.uak)}
    url = f"/v2/keys/{target.aci}/1"
    assert client.get(url, headers=token).status_code == 401
    assert client.get(url, headers={**token, **uak}).status_code == 400
    assert client.get(url, headers={**token, **target.auth}).status_code == 400


def test_unrestricted_account_accepts_any_16_byte_key(client: TestClient) -> None:
    target = register(client, TARGET, accountAttributes={"unrestrictedUnidentifiedAccess": True})
    assert anon_fetch(client, target, uak=secrets.token_bytes(16)).status_code == 200
    assert anon_fetch(client, target, uak=bytes(16)).status_code == 200
    assert anon_fetch(client, target, uak=bytes(15)).status_code == 401
    assert anon_fetch(client, target, uak=bytes(16), service_id=f"PNI:{target.pni}").status_code == 401


@pytest.mark.parametrize("device", ["0", "128", "abc", "-1", "1.0", "999999999999"])
def test_bad_device_id_is_422(client: TestClient, target: TestAccount, device: str) -> None:
    assert client.get(f"/v2/keys/{target.aci}/{device}", headers=target.auth).status_code == 422


def test_unknown_device_404_authenticated_401_anonymous(
    client: TestClient, target: TestAccount, caller: TestAccount
) -> None:
    for device in ("2", "127"):
        assert client.get(f"/v2/keys/{target.aci}/{device}", headers=caller.auth).status_code == 404
        assert anon_fetch(client, target, device).status_code == 401
    assert client.get(f"/v2/keys/{target.aci}/1", headers=caller.auth).status_code == 200


def test_multi_device_bundle_skips_devices_without_keys(client: TestClient, target: TestAccount) -> None:
    linked = add_linked_device(client, target.aci, 2)
    assert put_keys(client, target, preKeys=ec_keys(range(1, 3))).status_code == 204
    # device 2 has no signed key and no last-resort key yet: left out, and 404 when asked for by id
    devices = anon_fetch(client, target, "*").json()["devices"]
    assert [d["deviceId"] for d in devices] == [1]
    assert client.get(f"/v2/keys/{target.aci}/2", headers=target.auth).status_code == 404

    identity = target.aci_identity
    body = full_upload(identity, range(100, 103), range(100, 103), signed_id=300, last_resort_id=301)
    assert client.put("/v2/keys", json=body, headers=linked).status_code == 204
    devices = anon_fetch(client, target, "*").json()["devices"]
    assert [d["deviceId"] for d in devices] == [1, 2]
    second = devices[1]
    assert second["registrationId"] == 77
    assert second["signedPreKey"]["keyId"] == 300
    assert second["preKey"]["keyId"] == 100 and second["pqPreKey"]["keyId"] == 100
    assert devices[0]["preKey"]["keyId"] == 2  # device 1's own pool: key 1 went to the first fetch
    # a fetch for one device consumes only that device's keys
    only_two = anon_fetch(client, target, "2").json()["devices"]
    assert [d["deviceId"] for d in only_two] == [2] and only_two[0]["preKey"]["keyId"] == 101
    assert counts(client, target) == {"count": 0, "pqCount": 0}
    response = client.get("/v2/keys", headers=linked)
    assert response.json() == {"count": 1, "pqCount": 1}


def test_prekeys_rate_limit_for_authenticated_callers_only(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    limits = {"prekeys": {"capacity": 2, "permit_seconds": 60}}
    with custom_client(backend, tmp_path, request, rate_limits=limits) as client:
        target = register(client, TARGET)
        caller = register(client, CALLER)
        url = f"/v2/keys/{target.aci}/1"
        assert client.get(url, headers=caller.auth).status_code == 200
        assert client.get(url, headers=caller.auth).status_code == 200
        limited = client.get(url, headers=caller.auth)
        assert limited.status_code == 429
        assert int(limited.headers["Retry-After"]) >= 1
        for _ in range(5):
            assert anon_fetch(client, target).status_code == 200


def test_first_upload_of_a_device_needs_both_repeated_use_keys(client: TestClient, target: TestAccount) -> None:
    linked = add_linked_device(client, target.aci, 2)
    identity = target.aci_identity
    only_signed = {"signedPreKey": identity.signed_ec(400)}
    response = client.put("/v2/keys", json=only_signed, headers=linked)
    assert response.status_code == 422 and "both" in response.json()["message"]
    assert client.get(f"/v2/keys/{target.aci}/2", headers=target.auth).status_code == 404
    both = {"signedPreKey": identity.signed_ec(400), "pqLastResortPreKey": identity.signed_kem(401)}
    assert client.put("/v2/keys", json=both, headers=linked).status_code == 204
    # once both exist, either may be replaced on its own
    assert client.put("/v2/keys", json={"signedPreKey": identity.signed_ec(402)}, headers=linked).status_code == 204
    bundle = client.get(f"/v2/keys/{target.aci}/2", headers=target.auth).json()["devices"][0]
    assert bundle["signedPreKey"]["keyId"] == 402 and bundle["pqPreKey"]["keyId"] == 401
