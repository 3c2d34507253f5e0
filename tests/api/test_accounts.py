"""Account endpoints (digest §10), remote config, health, metrics and the OpenAPI document."""

from __future__ import annotations

import base64
import re
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.foundation_support import (
    LOCK_TOKEN,
    account_by_aci,
    add_linked_device,
    assert_error_body,
    call,
    custom_client,
    random_b64,
    reregister,
    rows_referencing,
    services,
)
from tests.helpers import basic, register

NUMBER = "+15555550030"


def attributes(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "fetchesMessages": True,
        "registrationId": 1234,
        "pniRegistrationId": 4321,
        "capabilities": {"spqr": True, "storage": True},
        "unidentifiedAccessKey": random_b64(16),
        "unrestrictedUnidentifiedAccess": False,
        "discoverableByPhoneNumber": True,
    }
    body.update(overrides)
    return body


# -- whoami --------------------------------------------------------------------------------------


def test_whoami_with_device_and_bare_usernames(client: TestClient) -> None:
    account = register(client, NUMBER)
    for user in (f"{account.aci}.1", account.aci, account.aci.upper()):
        response = client.get("/v1/accounts/whoami", headers=basic(user, account.password))
        assert response.status_code == 200, (user, response.text)
        body = response.json()
        assert body["uuid"] == account.aci and body["pni"] == account.pni and body["number"] == NUMBER
        assert body["storageCapable"] is True
        assert body["entitlements"] == {"badges": [], "backup": None}
        assert "reregistration" not in body


def _bad_headers(aci: str, password: str) -> list[dict[str, str]]:
    return [
        {},
        basic(aci, password + "x"),
        basic(f"{aci}.1", ""),
        basic(str(uuid.uuid4()), password),
        basic(f"{aci}.2", password),  # no such device
        basic(f"{aci}.0", password),
        basic(f"{aci}.128", password),
        basic(f"{aci}.x", password),
        basic(NUMBER, password),  # numbers are not usernames
        basic(aci.replace("-", ""), password),
        {"Authorization": "Basic !!!notbase64"},
        {"Authorization": "Basic " + base64.b64encode(f"{aci}{password}".encode()).decode()},  # no colon
        {"Authorization": "Basic"},
        {"Authorization": "Digest " + base64.b64encode(f"{aci}:{password}".encode()).decode()},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": ""},
    ]


def test_whoami_rejects_bad_credentials_with_a_challenge(client: TestClient) -> None:
    account = register(client, NUMBER)
    for headers in _bad_headers(account.aci, account.password):
        response = client.get("/v1/accounts/whoami", headers=headers)
        assert_error_body(response, 401)
        assert response.headers["WWW-Authenticate"].lower().startswith("basic"), headers


# -- attributes ----------------------------------------------------------------------------------


def test_set_attributes(client: TestClient) -> None:
    account = register(client, NUMBER)
    uak = random_b64(16)
    response = client.put(
        "/v1/accounts/attributes/",
        json=attributes(unidentifiedAccessKey=uak, unrestrictedUnidentifiedAccess=True,
                        discoverableByPhoneNumber=False, registrationId=99, name=random_b64(40),
                        capabilities={"spqr": True, "bogus": True}),
        headers={**account.auth, "X-Signal-Agent": "OWD"},
    )
    assert response.status_code == 204, response.text
    assert response.content == b""
    stored = account_by_aci(client, account.aci)
    assert stored is not None and stored.primary is not None
    assert stored.unidentified_access_key == base64.b64decode(uak)
    assert stored.unrestricted_unidentified_access is True
    assert stored.discoverable_by_phone_number is False
    assert stored.primary.registration_id == 99
    assert stored.primary.capabilities == {"spqr": True}
    assert stored.primary.user_agent == "OWD"
    report = client.get("/v2/accounts/data_report", headers=account.auth).json()
    assert report["data"]["account"]["allowSealedSenderFromAnyone"] is True
    assert report["data"]["account"]["findAccountByPhoneNumber"] is False
    # The path without the trailing slash is the same endpoint.
    response = client.put("/v1/accounts/attributes", json=attributes(), headers=account.auth)
    assert response.status_code == 204


def test_attributes_keep_the_access_key_when_omitted(client: TestClient) -> None:
    account = register(client, NUMBER)
    body = attributes()
    del body["unidentifiedAccessKey"]
    assert client.put("/v1/accounts/attributes/", json=body, headers=account.auth).status_code == 204
    stored = account_by_aci(client, account.aci)
    assert stored is not None and stored.unidentified_access_key == account.uak


def test_attributes_set_and_clear_registration_lock(client: TestClient) -> None:
    account = register(client, NUMBER)
    response = client.put("/v1/accounts/attributes/", json=attributes(registrationLock=LOCK_TOKEN),
                          headers=account.auth)
    assert response.status_code == 204
    response, _ = reregister(client, NUMBER)
    assert response.status_code == 423, response.text

    # The lock froze the old credentials; take the account back with the token, then clear the lock.
    response, reg = reregister(client, NUMBER, accountAttributes={"registrationLock": LOCK_TOKEN})
    assert response.status_code == 200
    auth = basic(account.aci, reg.password)
    assert client.put("/v1/accounts/attributes/", json=attributes(registrationLock=""), headers=auth).status_code == 204
    response, _ = reregister(client, NUMBER)
    assert response.status_code == 200, response.text


def test_attributes_without_lock_clear_it(client: TestClient) -> None:
    account = register(client, NUMBER, accountAttributes={"registrationLock": LOCK_TOKEN})
    assert client.put("/v1/accounts/attributes/", json=attributes(), headers=account.auth).status_code == 204
    response, _ = reregister(client, NUMBER)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "body",
    [
        {},
        [],
        attributes(registrationId=0),
        attributes(registrationId="one"),
        attributes(unidentifiedAccessKey=random_b64(17)),
        attributes(unidentifiedAccessKey="%%%"),
        attributes(registrationLock="12ab"),
        attributes(name=random_b64(300)),
        attributes(recoveryPassword=random_b64(31)),
        attributes(capabilities=["spqr"]),
    ],
)
def test_attributes_bad_body_is_422(client: TestClient, body: Any) -> None:
    account = register(client, NUMBER)
    assert_error_body(client.put("/v1/accounts/attributes/", json=body, headers=account.auth), 422)


def test_attributes_need_authentication(client: TestClient) -> None:
    assert_error_body(client.put("/v1/accounts/attributes/", json=attributes()), 401)


# -- push tokens ---------------------------------------------------------------------------------


def test_gcm_and_apn_tokens(client: TestClient) -> None:
    account = register(client, NUMBER)

    def primary() -> Any:
        stored = account_by_aci(client, account.aci)
        assert stored is not None and stored.primary is not None
        return stored.primary

    response = client.put("/v1/accounts/gcm/", json={"gcmRegistrationId": "gcm-1"}, headers=account.auth)
    assert response.status_code == 204
    device = primary()
    assert device.gcm_token == "gcm-1" and device.apn_token is None and device.fetches_messages is False

    response = client.put("/v1/accounts/apn/", json={"apnRegistrationId": "apn-1"}, headers=account.auth)
    assert response.status_code == 204
    device = primary()
    assert device.apn_token == "apn-1" and device.gcm_token is None

    assert client.delete("/v1/accounts/apn/", headers=account.auth).status_code == 204
    assert primary().apn_token is None

    assert client.put("/v1/accounts/gcm", json={"gcmRegistrationId": "gcm-2"}, headers=account.auth).status_code == 204
    assert primary().gcm_token == "gcm-2"
    assert client.delete("/v1/accounts/gcm/", headers=account.auth).status_code == 204
    assert primary().gcm_token is None


@pytest.mark.parametrize("kind", ["gcm", "apn"])
def test_push_token_errors(client: TestClient, kind: str) -> None:
    account = register(client, NUMBER)
    field = f"{kind}RegistrationId"
    url = f"/v1/accounts/{kind}/"
    assert_error_body(client.put(url, json={field: "t"}), 401)
    assert_error_body(client.delete(url), 401)
    assert_error_body(client.put(url, json={field: "t"}, headers=basic(account.aci, "wrong")), 401)
    for body in ({}, {field: ""}, {field: 5}, {field: "x" * 5000}):
        assert_error_body(client.put(url, json=body, headers=account.auth), 422)


# -- registration lock endpoints -----------------------------------------------------------------


def test_registration_lock_endpoints(client: TestClient) -> None:
    account = register(client, NUMBER)
    response = client.put("/v1/accounts/registration_lock", json={"registrationLock": LOCK_TOKEN},
                          headers=account.auth)
    assert response.status_code == 204
    response, _ = reregister(client, NUMBER)
    assert response.status_code == 423

    response, reg = reregister(client, NUMBER, accountAttributes={"registrationLock": LOCK_TOKEN})
    assert response.status_code == 200
    auth = basic(account.aci, reg.password)
    response = client.put("/v1/accounts/registration_lock", json={"registrationLock": LOCK_TOKEN}, headers=auth)
    assert response.status_code == 204
    assert client.delete("/v1/accounts/registration_lock", headers=auth).status_code == 204
    response, _ = reregister(client, NUMBER)
    assert response.status_code == 200, response.text


def test_registration_lock_endpoint_errors(client: TestClient) -> None:
    account = register(client, NUMBER)
    url = "/v1/accounts/registration_lock"
    assert_error_body(client.put(url, json={"registrationLock": LOCK_TOKEN}), 401)
    assert_error_body(client.delete(url), 401)
    for body in ({}, {"registrationLock": "abc"}, {"registrationLock": "g" * 64}, {"registrationLock": ""}):
        assert_error_body(client.put(url, json=body, headers=account.auth), 422)
    linked = add_linked_device(client, account.aci)
    assert client.get("/v1/accounts/whoami", headers=linked).status_code == 200
    assert_error_body(client.put(url, json={"registrationLock": LOCK_TOKEN}, headers=linked), 403)
    assert_error_body(client.delete(url, headers=linked), 403)


# -- deletion ------------------------------------------------------------------------------------


def test_delete_account_leaves_nothing(client: TestClient) -> None:
    account = register(client, NUMBER, accountAttributes={"registrationLock": LOCK_TOKEN})
    aci = uuid.UUID(account.aci)
    linked = add_linked_device(client, account.aci)
    assert client.post("/v1/auth/session", headers=account.auth).status_code == 200
    before = rows_referencing(client, aci)
    assert before["accounts"] == 1 and before["devices"] == 2 and before["refresh_tokens"] == 1

    assert client.delete("/v1/accounts/me", headers=account.auth).status_code == 204

    store = services(client).accounts.store
    counts = call(client, store.count_rows_for, aci)
    assert counts and all(n == 0 for n in counts.values()), counts
    assert all(n == 0 for n in rows_referencing(client, aci).values())
    assert client.get("/v1/accounts/whoami", headers=account.auth).status_code == 401
    assert client.get("/v1/accounts/whoami", headers=linked).status_code == 401
    assert client.head(f"/v1/accounts/account/{account.aci}").status_code == 404
    assert client.head(f"/v1/accounts/account/PNI:{account.pni}").status_code == 404

    # The number can be registered again, as a new account, and the old lock is gone with it.
    response, _ = reregister(client, NUMBER)
    assert response.status_code == 200, response.text
    assert response.json()["reregistration"] is False
    assert response.json()["pni"] == account.pni


def test_delete_account_needs_authentication(client: TestClient) -> None:
    account = register(client, NUMBER)
    assert_error_body(client.delete("/v1/accounts/me"), 401)
    assert_error_body(client.delete("/v1/accounts/me", headers=basic(account.aci, "nope")), 401)
    assert client.get("/v1/accounts/whoami", headers=account.auth).status_code == 200


def test_deleting_one_account_leaves_others(client: TestClient) -> None:
    first = register(client, NUMBER)
    second = register(client, "+15555550031")
    assert client.delete("/v1/accounts/me", headers=first.auth).status_code == 204
    assert client.get("/v1/accounts/whoami", headers=second.auth).status_code == 200
    assert rows_referencing(client, uuid.UUID(second.aci))["signed_keys"] == 2


# -- data report ---------------------------------------------------------------------------------

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def test_data_report(client: TestClient) -> None:
    account = register(client, NUMBER)
    client.put("/v1/accounts/attributes/", json=attributes(), headers={**account.auth, "X-Signal-Agent": "OWA"})
    response = client.get("/v2/accounts/data_report", headers=account.auth)
    assert response.status_code == 200
    report = response.json()
    assert set(report) == {"reportId", "reportTimestamp", "data", "text"}
    uuid.UUID(report["reportId"])
    assert TIMESTAMP.match(report["reportTimestamp"])
    datetime.strptime(report["reportTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
    assert report["data"]["account"] == {
        "phoneNumber": NUMBER, "badges": [], "allowSealedSenderFromAnyone": False, "findAccountByPhoneNumber": True,
    }
    [device] = report["data"]["devices"]
    assert device["id"] == 1 and device["userAgent"] == "OWA"
    assert TIMESTAMP.match(device["lastSeen"]) and TIMESTAMP.match(device["created"])
    assert device["lastSeen"].endswith("T00:00:00Z")  # last seen is kept to the day
    assert NUMBER in report["text"] and "# Devices" in report["text"]
    assert_error_body(client.get("/v2/accounts/data_report"), 401)


# -- account existence ---------------------------------------------------------------------------


def test_account_existence(client: TestClient) -> None:
    account = register(client, NUMBER)
    assert client.head(f"/v1/accounts/account/{account.aci}").status_code == 200
    assert client.head(f"/v1/accounts/account/PNI:{account.pni}").status_code == 200
    assert client.head(f"/v1/accounts/account/{uuid.uuid4()}").status_code == 404
    assert client.head(f"/v1/accounts/account/PNI:{uuid.uuid4()}").status_code == 404
    # A PNI is not an ACI, and the ACI: prefix is not accepted.
    assert client.head(f"/v1/accounts/account/{account.pni}").status_code == 404
    assert client.head(f"/v1/accounts/account/ACI:{account.aci}").status_code == 400
    assert client.head("/v1/accounts/account/not-a-uuid").status_code == 400
    assert client.head(f"/v1/accounts/account/{account.aci}", headers=account.auth).status_code == 400
    assert client.head(f"/v1/accounts/account/{account.aci}", headers=basic("a", "b")).status_code == 400


def test_account_existence_is_limited_per_ip(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    limits = {"checkAccountExistence": {"capacity": 3, "permit_seconds": 3600}}
    with custom_client(backend, tmp_path, request, rate_limits=limits) as client:
        target = f"/v1/accounts/account/{uuid.uuid4()}"
        for _ in range(3):
            assert client.head(target).status_code == 404
        response = client.head(target)
        assert response.status_code == 429
        assert int(response.headers["Retry-After"]) > 3000
        response = client.get(target)  # GET is not routed; only HEAD counts
        assert response.status_code == 405


# -- remote config, health, metrics, OpenAPI -----------------------------------------------------


def test_remote_config(client: TestClient) -> None:
    response = client.get("/v2/config")
    assert response.status_code == 200
    config = response.json()["config"]
    assert isinstance(config, dict) and config
    assert all(isinstance(v, bool) for v in config.values())
    assert config["mailslot.jwtSessions"] is True and config["mailslot.totp"] is True
    for off in ("global.usernames", "global.cdsi", "global.svr", "global.payments", "global.backups"):
        assert config[off] is False
    etag = response.headers["ETag"]
    cached = client.get("/v2/config", headers={"If-None-Match": etag})
    assert cached.status_code == 304
    assert client.get("/v2/config", headers={"If-None-Match": '"other"'}).status_code == 200


def test_health(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "ok"}
    response = client.get("/health/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"storage": "ok"}}

    async def broken() -> None:
        raise ConnectionError("down")

    services(client).readiness_checks["bus"] = broken
    response = client.get("/health/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "checks": {"storage": "ok", "bus": "unavailable"}}


def test_metrics(client: TestClient) -> None:
    client.get("/health/live")
    client.get(f"/v1/verification/session/{base64.urlsafe_b64encode(b'x' * 32).decode()}")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "mailslot_http_requests_total" in text and "mailslot_http_request_seconds" in text
    assert 'route="/health/live"' in text
    # Labels carry route templates, never raw paths with identifiers.
    assert 'route="/v1/verification/session/{session_id}"' in text
    assert "eHh4" not in text


EXPECTED_OPERATIONS = {
    ("post", "/v1/verification/session"): {"200", "422", "429"},
    ("get", "/v1/verification/session/{session_id}"): {"200", "404"},
    ("patch", "/v1/verification/session/{session_id}"): {"200", "404", "422"},
    ("post", "/v1/verification/session/{session_id}/code"): {"200", "404", "409", "429", "440"},
    ("put", "/v1/verification/session/{session_id}/code"): {"200", "404", "409", "429"},
    ("post", "/v1/registration"): {"200", "400", "401", "403", "409", "422", "423", "429", "441", "499"},
    ("get", "/v1/accounts/whoami"): {"200", "401"},
    ("put", "/v1/accounts/attributes/"): {"204", "401", "422"},
    ("put", "/v1/accounts/gcm/"): {"204", "401"},
    ("delete", "/v1/accounts/gcm/"): {"204", "401"},
    ("put", "/v1/accounts/apn/"): {"204", "401"},
    ("delete", "/v1/accounts/apn/"): {"204", "401"},
    ("put", "/v1/accounts/registration_lock"): {"204", "401", "422"},
    ("delete", "/v1/accounts/registration_lock"): {"204", "401"},
    ("delete", "/v1/accounts/me"): {"204", "401"},
    ("get", "/v2/accounts/data_report"): {"200", "401"},
    ("head", "/v1/accounts/account/{service_id}"): {"200", "400", "404", "429"},
    ("put", "/v1/accounts/totp"): {"200", "401"},
    ("put", "/v1/accounts/totp/confirm"): {"204", "401", "409", "422"},
    ("delete", "/v1/accounts/totp"): {"204", "401", "403", "404", "422", "429"},
    ("post", "/v1/auth/session"): {"200", "401", "429"},
    ("post", "/v1/auth/session/refresh"): {"200", "401"},
    ("get", "/v2/config"): {"200"},
    ("get", "/health/live"): {"200"},
    ("get", "/health/ready"): {"200", "503"},
}


def test_openapi_describes_every_endpoint(client: TestClient) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    missing = []
    for (method, path), statuses in EXPECTED_OPERATIONS.items():
        operation = document["paths"].get(path, {}).get(method)
        if operation is None:
            missing.append(f"{method.upper()} {path}")
            continue
        documented = set(operation["responses"])
        if not statuses <= documented:
            missing.append(f"{method.upper()} {path}: {sorted(statuses - documented)}")
    assert not missing, missing
    schemas = document["components"]["schemas"]
    assert {"RegistrationBody", "AccountAttributesModel", "SessionResponse"} <= set(schemas)


def test_docs_page(client: TestClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    assert "/openapi.json" in response.text


def test_every_response_has_a_server_timestamp(client: TestClient) -> None:
    for response in (client.get("/health/live"), client.get("/nope"), client.get("/v1/accounts/whoami")):
        assert response.headers["X-Signal-Timestamp"].isdigit()
