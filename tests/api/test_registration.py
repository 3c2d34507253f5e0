"""``POST /v1/registration`` (digest §1.2, §2.4): every outcome it can have."""

from __future__ import annotations

import base64
import secrets
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mailslot.services.accounts import REGISTRATION_LOCK_WINDOW_MS
from tests.api.foundation_support import (
    LOCK_TOKEN,
    OTHER_LOCK_TOKEN,
    Registration,
    account_by_number,
    assert_error_body,
    call,
    custom_client,
    random_b64,
    reregister,
    services,
)
from tests.helpers import Identity, b64, basic, register, verified_session

NUMBER = "+15555550020"
OTHER = "+15555550021"


def whoami_status(client: TestClient, headers: dict[str, str]) -> int:
    return client.get("/v1/accounts/whoami", headers=headers).status_code


def test_new_registration(client: TestClient) -> None:
    reg = Registration(NUMBER)
    response = reg.post(client, verified_session(client, NUMBER), headers={"X-Signal-Agent": "OWD"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= {"uuid", "number", "pni", "usernameHash", "usernameLinkHandle", "storageCapable",
                         "entitlements", "reregistration"}
    assert uuid.UUID(body["uuid"]) != uuid.UUID(body["pni"])
    assert body["number"] == NUMBER
    assert body["reregistration"] is False
    assert body["usernameHash"] is None and body["usernameLinkHandle"] is None
    assert whoami_status(client, basic(body["uuid"], reg.password)) == 200


def test_reregistration_keeps_aci_and_drops_old_credentials(client: TestClient) -> None:
    first = register(client, NUMBER)
    response, reg = reregister(client, NUMBER)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["reregistration"] is True
    assert body["uuid"] == first.aci and body["pni"] == first.pni
    assert body["storageCapable"] is True  # the previous primary had the storage capability
    assert whoami_status(client, first.auth) == 401
    assert whoami_status(client, basic(f"{first.aci}.1", reg.password)) == 200
    stored = account_by_number(client, NUMBER)
    assert stored is not None and stored.aci_identity_key == reg.aci_identity.public
    assert [d.device_id for d in stored.devices] == [1]


def test_password_may_contain_colons(client: TestClient) -> None:
    reg = Registration(NUMBER, password="pa:ss:word:")
    response = reg.post(client, verified_session(client, NUMBER))
    assert response.status_code == 200, response.text
    aci = response.json()["uuid"]
    assert whoami_status(client, basic(aci, "pa:ss:word:")) == 200
    assert whoami_status(client, basic(aci, "pa")) == 401


def test_numbers_get_distinct_identifiers(client: TestClient) -> None:
    first = register(client, NUMBER)
    second = register(client, OTHER)
    assert first.pni != second.pni and first.aci != second.aci


def test_missing_basic_credentials_is_401(client: TestClient) -> None:
    reg = Registration(NUMBER)
    session_id = verified_session(client, NUMBER)
    response = client.post("/v1/registration", json=reg.body(session_id))
    assert_error_body(response, 401)
    response = client.post("/v1/registration", json=reg.body(session_id), headers=basic(NUMBER, ""))
    assert_error_body(response, 401)
    assert account_by_number(client, NUMBER) is None


def test_unverified_session_is_401(client: TestClient) -> None:
    session_id = client.post("/v1/verification/session", json={"number": NUMBER}).json()["id"]
    reg = Registration(NUMBER)
    assert_error_body(reg.post(client, session_id), 401)
    client.post(f"/v1/verification/session/{session_id}/code", json={"transport": "sms"})
    assert_error_body(reg.post(client, session_id), 401)
    client.put(f"/v1/verification/session/{session_id}/code", json={"code": "000000"})
    assert_error_body(reg.post(client, session_id), 401)
    assert account_by_number(client, NUMBER) is None


def test_session_for_another_number_is_400(client: TestClient) -> None:
    session_id = verified_session(client, OTHER)
    assert_error_body(Registration(NUMBER).post(client, session_id), 400)
    assert account_by_number(client, NUMBER) is None


@pytest.mark.parametrize(
    "session_id", ["abc", "!!!!", base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(), "x" * 128]
)
def test_bad_session_id_is_400(client: TestClient, session_id: str) -> None:
    assert_error_body(Registration(NUMBER).post(client, session_id), 400)


def test_session_id_or_recovery_password_required(client: TestClient) -> None:
    assert_error_body(Registration(NUMBER).post(client, None), 422)


def test_header_number_must_be_normalised(client: TestClient) -> None:
    reg = Registration("+1 415 555 2671")
    response = reg.post(client, base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
    assert response.status_code == 400
    assert response.json() == {"originalNumber": "+1 415 555 2671", "normalizedNumber": "+14155552671"}
    assert_error_body(Registration("not-a-number").post(client, None), 422)


# -- recovery password ---------------------------------------------------------------------------


def test_recovery_password(client: TestClient) -> None:
    rrp = secrets.token_bytes(32)
    first = register(client, NUMBER, accountAttributes={"recoveryPassword": b64(rrp)})
    wrong = Registration(NUMBER).post(client, None, recoveryPassword=random_b64(32))
    assert_error_body(wrong, 403)
    assert whoami_status(client, first.auth) == 200  # a wrong RRP changes nothing

    reg = Registration(NUMBER)
    response = reg.post(client, None, recoveryPassword=b64(rrp))
    assert response.status_code == 200, response.text
    assert response.json()["reregistration"] is True and response.json()["uuid"] == first.aci
    assert whoami_status(client, first.auth) == 401
    # The RRP was not sent again with the new attributes, so it no longer works.
    assert_error_body(Registration(NUMBER).post(client, None, recoveryPassword=b64(rrp)), 403)


def test_recovery_password_for_unknown_number_is_403(client: TestClient) -> None:
    assert_error_body(Registration(NUMBER).post(client, None, recoveryPassword=random_b64(32)), 403)


def test_recovery_password_must_be_32_bytes(client: TestClient) -> None:
    assert_error_body(Registration(NUMBER).post(client, None, recoveryPassword=random_b64(16)), 422)


# -- device transfer -----------------------------------------------------------------------------


def test_device_transfer_is_409_unless_skipped(client: TestClient) -> None:
    first = register(client, NUMBER, accountAttributes={"capabilities": {"spqr": True, "transfer": True}})
    response, _ = reregister(client, NUMBER, skipDeviceTransfer=False)
    assert_error_body(response, 409)
    assert whoami_status(client, first.auth) == 200
    response, _ = reregister(client, NUMBER, skipDeviceTransfer=True)
    assert response.status_code == 200, response.text


def test_no_transfer_capability_means_no_409(client: TestClient) -> None:
    register(client, NUMBER)
    response, _ = reregister(client, NUMBER, skipDeviceTransfer=False)
    assert response.status_code == 200, response.text


# -- validation ----------------------------------------------------------------------------------


def _bad_signatures() -> list[tuple[str, Any]]:
    stranger = Identity.generate()
    return [
        ("aciSignedPreKey", lambda reg: stranger.signed_ec(1)),
        ("aciPqLastResortPreKey", lambda reg: stranger.signed_kem(3)),
        ("pniSignedPreKey", lambda reg: reg.aci_identity.signed_ec(2)),
        ("pniPqLastResortPreKey", lambda reg: reg.aci_identity.signed_kem(4)),
        ("aciSignedPreKey", lambda reg: {**reg.aci_identity.signed_ec(1), "signature": random_b64(64)}),
    ]


@pytest.mark.parametrize(("field", "make"), _bad_signatures())
def test_bad_signature_is_422_and_stores_nothing(client: TestClient, field: str, make: Any) -> None:
    reg = Registration(NUMBER)
    session_id = verified_session(client, NUMBER)
    response = reg.post(client, session_id, **{field: make(reg)})
    body = assert_error_body(response, 422)
    assert "signature" in body["message"].lower()
    assert account_by_number(client, NUMBER) is None
    # The same verified session can still register: nothing half-written is in the way.
    response = reg.post(client, session_id)
    assert response.status_code == 200 and response.json()["reregistration"] is False


def test_bad_signature_on_reregistration_keeps_the_old_account(client: TestClient) -> None:
    first = register(client, NUMBER)
    stranger = Identity.generate()
    response, _ = reregister(client, NUMBER, aciSignedPreKey=stranger.signed_ec(1))
    assert_error_body(response, 422)
    assert whoami_status(client, first.auth) == 200


@pytest.mark.parametrize("missing", ["pniIdentityKey", "pniSignedPreKey", "pniPqLastResortPreKey", "pniRegistrationId"])
def test_pni_fields_all_or_nothing(client: TestClient, missing: str) -> None:
    reg = Registration(NUMBER)
    session_id = verified_session(client, NUMBER)
    if missing == "pniRegistrationId":
        response = reg.post(client, session_id, accountAttributes={"pniRegistrationId": None})
    else:
        response = reg.post(client, session_id, **{missing: None})
    assert_error_body(response, 422)
    assert account_by_number(client, NUMBER) is None


def test_no_pni_fields_at_all_is_422_for_a_number(client: TestClient) -> None:
    reg = Registration(NUMBER)
    response = reg.post(client, verified_session(client, NUMBER), pniIdentityKey=None, pniSignedPreKey=None,
                        pniPqLastResortPreKey=None, accountAttributes={"pniRegistrationId": None})
    assert_error_body(response, 422)


@pytest.mark.parametrize(
    ("fetches", "tokens", "status"),
    [
        (True, {"apnToken": {"apnRegistrationId": "apn"}}, 422),
        (True, {"gcmToken": {"gcmRegistrationId": "gcm"}}, 422),
        (False, {}, 422),
        (False, {"apnToken": {"apnRegistrationId": "a"}, "gcmToken": {"gcmRegistrationId": "g"}}, 422),
        (False, {"gcmToken": {"gcmRegistrationId": "gcm"}}, 200),
        (False, {"apnToken": {"apnRegistrationId": "apn"}}, 200),
    ],
)
def test_delivery_channel_rule(client: TestClient, fetches: bool, tokens: dict[str, Any], status: int) -> None:
    reg = Registration(NUMBER)
    response = reg.post(client, verified_session(client, NUMBER), accountAttributes={"fetchesMessages": fetches},
                        **tokens)
    assert response.status_code == status, response.text
    if status == 422:
        assert_error_body(response, 422)
        assert account_by_number(client, NUMBER) is None
    else:
        stored = account_by_number(client, NUMBER)
        assert stored is not None and stored.primary is not None
        assert stored.primary.gcm_token == tokens.get("gcmToken", {}).get("gcmRegistrationId")
        assert stored.primary.apn_token == tokens.get("apnToken", {}).get("apnRegistrationId")


@pytest.mark.parametrize(
    "overrides",
    [
        {"aciIdentityKey": random_b64(32)},
        {"aciIdentityKey": "***"},
        {"accountAttributes": {"registrationId": 0}},
        {"accountAttributes": {"registrationId": 16384}},
        {"accountAttributes": {"unidentifiedAccessKey": random_b64(15)}},
        {"accountAttributes": {"unidentifiedAccessKey": None}},
        {"accountAttributes": {"registrationLock": "abc"}},
        {"accountAttributes": {"name": random_b64(226)}},
        {"aciSignedPreKey": {"keyId": -1, "publicKey": random_b64(33), "signature": random_b64(64)}},
        {"skipDeviceTransfer": None},
        {"totp": -1},
    ],
)
def test_invalid_fields_are_422(client: TestClient, overrides: dict[str, Any]) -> None:
    reg = Registration(NUMBER)
    assert_error_body(reg.post(client, verified_session(client, NUMBER), **overrides), 422)
    assert account_by_number(client, NUMBER) is None


@pytest.mark.parametrize("capabilities", [{"storage": True}, {"spqr": False}, {}])
def test_missing_spqr_capability_is_499(client: TestClient, capabilities: dict[str, bool]) -> None:
    reg = Registration(NUMBER)
    response = reg.post(client, verified_session(client, NUMBER), accountAttributes={"capabilities": capabilities})
    assert_error_body(response, 499)
    assert account_by_number(client, NUMBER) is None


def test_unknown_capabilities_are_dropped(client: TestClient) -> None:
    register(client, NUMBER, accountAttributes={"capabilities": {"spqr": True, "teleport": True, "storage": False}})
    stored = account_by_number(client, NUMBER)
    assert stored is not None and stored.primary is not None
    assert stored.primary.capabilities == {"spqr": True}


# -- registration lock ---------------------------------------------------------------------------


def test_registration_lock(client: TestClient) -> None:
    first = register(client, NUMBER, accountAttributes={"registrationLock": LOCK_TOKEN})

    response, _ = reregister(client, NUMBER)
    assert response.status_code == 423, response.text
    body = response.json()
    assert set(body) == {"timeRemaining", "svr2Credentials"}
    assert body["svr2Credentials"] is None
    assert 0 < body["timeRemaining"] <= REGISTRATION_LOCK_WINDOW_MS
    # The old account is frozen: its password no longer works, but it still exists.
    assert whoami_status(client, first.auth) == 401
    assert client.head(f"/v1/accounts/account/{first.aci}").status_code == 200

    response, _ = reregister(client, NUMBER, accountAttributes={"registrationLock": OTHER_LOCK_TOKEN})
    assert response.status_code == 423

    response, reg = reregister(client, NUMBER, accountAttributes={"registrationLock": LOCK_TOKEN})
    assert response.status_code == 200, response.text
    assert response.json()["uuid"] == first.aci and response.json()["reregistration"] is True
    assert whoami_status(client, basic(first.aci, reg.password)) == 200


def test_registration_lock_wrong_tokens_use_the_pin_limiter(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    limits = {"pin": {"capacity": 1, "permit_seconds": 86400}}
    with custom_client(backend, tmp_path, request, rate_limits=limits) as client:
        register(client, NUMBER, accountAttributes={"registrationLock": LOCK_TOKEN})
        response, _ = reregister(client, NUMBER, accountAttributes={"registrationLock": OTHER_LOCK_TOKEN})
        assert response.status_code == 423
        response, _ = reregister(client, NUMBER, accountAttributes={"registrationLock": OTHER_LOCK_TOKEN})
        assert response.status_code == 429
        assert "Retry-After" in response.headers


def test_registration_lock_expires_with_inactivity(client: TestClient) -> None:
    first = register(client, NUMBER, accountAttributes={"registrationLock": LOCK_TOKEN})
    old = 1_000_000_000_000  # 2001
    call(client, services(client).accounts.store.touch_device, uuid.UUID(first.aci), 1, old)
    response, _ = reregister(client, NUMBER)
    assert response.status_code == 200, response.text
    assert response.json()["uuid"] == first.aci


def test_registration_lock_with_recovery_password(client: TestClient) -> None:
    rrp = secrets.token_bytes(32)
    register(client, NUMBER, accountAttributes={"registrationLock": LOCK_TOKEN, "recoveryPassword": b64(rrp)})
    response = Registration(NUMBER).post(client, None, recoveryPassword=b64(rrp))
    assert response.status_code == 423
    response = Registration(NUMBER).post(client, None, recoveryPassword=b64(rrp),
                                         accountAttributes={"registrationLock": LOCK_TOKEN})
    assert response.status_code == 200, response.text


def test_registration_lock_failure_deletes_the_recovery_password(client: TestClient) -> None:
    rrp = secrets.token_bytes(32)
    register(client, NUMBER, accountAttributes={"registrationLock": LOCK_TOKEN, "recoveryPassword": b64(rrp)})
    response, _ = reregister(client, NUMBER)  # someone verified the number by SMS, without the lock token
    assert response.status_code == 423
    response = Registration(NUMBER).post(client, None, recoveryPassword=b64(rrp),
                                         accountAttributes={"registrationLock": LOCK_TOKEN})
    assert_error_body(response, 403)


# -- rate limit ----------------------------------------------------------------------------------


def test_registration_limiter(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    limits = {"registration": {"capacity": 2, "permit_seconds": 3600}}
    with custom_client(backend, tmp_path, request, rate_limits=limits) as client:
        register(client, NUMBER)
        response, _ = reregister(client, NUMBER)
        assert response.status_code == 200
        response, _ = reregister(client, NUMBER)
        assert_error_body(response, 429)
        assert int(response.headers["Retry-After"]) > 0
        register(client, OTHER)  # keyed by number


# -- concurrency ---------------------------------------------------------------------------------

UNLIMITED_SESSIONS = {name: {"capacity": 1000, "permit_seconds": 0.01}
                      for name in ("verificationSessionPerIp", "verificationSessionPerNumber", "registration")}


def _race(client: TestClient, number: str, count: int) -> list[tuple[Registration, Any]]:
    """``count`` registrations of ``number``, each with its own verified session, released at once."""
    regs = [Registration(number) for _ in range(count)]
    sessions = [verified_session(client, number) for _ in range(count)]
    barrier = threading.Barrier(count)
    results: list[tuple[Registration, Any]] = []

    def go(index: int) -> None:
        barrier.wait()
        results.append((regs[index], regs[index].post(client, sessions[index])))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("existing", [False, True], ids=["new-number", "re-registration"])
def test_concurrent_registrations_of_one_number(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, existing: bool
) -> None:
    """Racing registrations never fail with a 500: the losers become re-registrations of the winner."""
    with custom_client(backend, tmp_path, request, rate_limits=UNLIMITED_SESSIONS) as client:
        for round_ in range(2):
            number = f"+155555500{90 + round_}"
            if existing:
                register(client, number)
            results = _race(client, number, 3)
            assert [r.status_code for _, r in results] == [200, 200, 200], [r.text for _, r in results]
            acis = {r.json()["uuid"] for _, r in results}
            assert len(acis) == 1
            fresh = [r.json()["reregistration"] for _, r in results].count(False)
            assert fresh == (0 if existing else 1)
            working = [reg for reg, r in results
                       if whoami_status(client, basic(r.json()["uuid"], reg.password)) == 200]
            assert len(working) == 1  # the last writer's device is the primary
            stored = account_by_number(client, number)
            assert stored is not None and [d.device_id for d in stored.devices] == [1]
