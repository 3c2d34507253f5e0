"""TOTP second factor (API.md §1.2): enrolment, confirmation, removal and the 441 on registration."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pyotp
import pytest
from fastapi.testclient import TestClient

from tests.api.foundation_support import add_linked_device, assert_error_body, custom_client, reregister
from tests.helpers import register

NUMBER = "+15555550050"
GENEROUS = {"registration": {"capacity": 100, "permit_seconds": 1}, "checkTotp": {"capacity": 100, "permit_seconds": 1}}


def enrol(client: TestClient, auth: dict[str, str]) -> dict[str, Any]:
    response = client.put("/v1/accounts/totp", headers=auth)
    assert response.status_code == 200, response.text
    return dict(response.json())


def confirm(client: TestClient, auth: dict[str, str], code: Any) -> Any:
    return client.put("/v1/accounts/totp/confirm", json={"code": code}, headers=auth)


def remove(client: TestClient, auth: dict[str, str], code: Any) -> Any:
    return client.request("DELETE", "/v1/accounts/totp", json={"code": code}, headers=auth)


def now_code(secret: str) -> int:
    return int(pyotp.TOTP(secret).now())


def wrong_code(secret: str) -> int:
    totp = pyotp.TOTP(secret)
    valid = {int(totp.at(time.time() + d)) for d in (-60, -30, 0, 30, 60)}
    return next(c for c in range(1_000_000) if c not in valid)


def enrolled(client: TestClient, auth: dict[str, str]) -> dict[str, Any]:
    enrolment = enrol(client, auth)
    assert confirm(client, auth, now_code(enrolment["secret"])).status_code == 204
    return enrolment


def test_enrolment_shape(client: TestClient) -> None:
    account = register(client, NUMBER)
    enrolment = enrol(client, account.auth)
    assert set(enrolment) == {"secret", "uri", "backupCodes"}
    secret = enrolment["secret"]
    pyotp.TOTP(secret).now()  # a valid base32 secret
    uri = urlparse(enrolment["uri"])
    assert uri.scheme == "otpauth" and uri.netloc == "totp"
    assert parse_qs(uri.query)["secret"] == [secret]
    assert NUMBER not in enrolment["uri"]
    codes = enrolment["backupCodes"]
    assert len(codes) == 10 and len(set(codes)) == 10
    assert all(isinstance(c, str) and c.isdigit() and len(c) == 10 and c[0] != "0" for c in codes)
    assert enrol(client, account.auth)["secret"] != secret  # each enrolment is fresh


def test_enrolment_is_not_enforced_until_confirmed(client: TestClient) -> None:
    account = register(client, NUMBER)
    enrol(client, account.auth)
    response, _ = reregister(client, NUMBER)
    assert response.status_code == 200, response.text


def test_confirm(client: TestClient) -> None:
    account = register(client, NUMBER)
    assert_error_body(confirm(client, account.auth, 123456), 409)  # nothing to confirm
    enrolment = enrol(client, account.auth)
    assert_error_body(confirm(client, account.auth, wrong_code(enrolment["secret"])), 422)
    assert confirm(client, account.auth, now_code(enrolment["secret"])).status_code == 204
    assert_error_body(confirm(client, account.auth, now_code(enrolment["secret"])), 409)  # already done


@pytest.mark.parametrize("body", [{}, {"code": "abc"}, {"code": -1}, {"code": 1_000_000}, {"code": [1]}])
def test_confirm_bad_body(client: TestClient, body: Any) -> None:
    account = register(client, NUMBER)
    enrol(client, account.auth)
    assert_error_body(client.put("/v1/accounts/totp/confirm", json=body, headers=account.auth), 422)


def test_totp_endpoints_need_the_primary(client: TestClient) -> None:
    account = register(client, NUMBER)
    linked = add_linked_device(client, account.aci)
    assert_error_body(client.put("/v1/accounts/totp"), 401)
    assert_error_body(client.put("/v1/accounts/totp", headers=linked), 403)
    enrolment = enrolled(client, account.auth)
    assert_error_body(remove(client, linked, now_code(enrolment["secret"])), 403)
    assert_error_body(remove(client, {}, now_code(enrolment["secret"])), 401)


def test_registration_needs_totp(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with custom_client(backend, tmp_path, request, rate_limits=GENEROUS) as client:
        account = register(client, NUMBER)
        enrolment = enrolled(client, account.auth)
        secret, backup = enrolment["secret"], enrolment["backupCodes"]

        response, _ = reregister(client, NUMBER)
        assert_error_body(response, 441)
        response, _ = reregister(client, NUMBER, totp=wrong_code(secret))
        assert_error_body(response, 441)
        assert client.get("/v1/accounts/whoami", headers=account.auth).status_code == 200  # nothing changed

        response, reg = reregister(client, NUMBER, totp=now_code(secret))
        assert response.status_code == 200, response.text
        assert response.json()["uuid"] == account.aci and response.json()["reregistration"] is True

        # TOTP stays on after re-registration; a backup code works once.
        response, _ = reregister(client, NUMBER, totp=int(backup[0]))
        assert response.status_code == 200, response.text
        response, _ = reregister(client, NUMBER, totp=int(backup[0]))
        assert_error_body(response, 441)
        response, _ = reregister(client, NUMBER, totp=int(backup[1]))
        assert response.status_code == 200, response.text


def test_pending_backup_codes_do_not_count(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with custom_client(backend, tmp_path, request, rate_limits=GENEROUS) as client:
        account = register(client, NUMBER)
        active = enrolled(client, account.auth)
        pending = enrol(client, account.auth)  # a second enrolment, not confirmed
        response, _ = reregister(client, NUMBER, totp=int(pending["backupCodes"][0]))
        assert_error_body(response, 441)
        response, _ = reregister(client, NUMBER, totp=int(active["backupCodes"][0]))
        assert response.status_code == 200, response.text


def test_remove_totp(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with custom_client(backend, tmp_path, request, rate_limits=GENEROUS) as client:
        account = register(client, NUMBER)
        assert_error_body(remove(client, account.auth, 123456), 404)  # not enrolled
        enrolment = enrolled(client, account.auth)
        assert_error_body(remove(client, account.auth, wrong_code(enrolment["secret"])), 422)
        assert_error_body(remove(client, account.auth, int(enrolment["backupCodes"][0])), 422)
        assert_error_body(client.delete("/v1/accounts/totp", headers=account.auth), 422)  # no body
        assert remove(client, account.auth, now_code(enrolment["secret"])).status_code == 204
        response, _ = reregister(client, NUMBER)
        assert response.status_code == 200, response.text


def test_check_totp_limit_on_confirm(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    limits = {"checkTotp": {"capacity": 3, "permit_seconds": 3600}}
    with custom_client(backend, tmp_path, request, rate_limits=limits) as client:
        account = register(client, NUMBER)
        enrolment = enrol(client, account.auth)
        bad = wrong_code(enrolment["secret"])
        for _ in range(3):
            assert confirm(client, account.auth, bad).status_code == 422
        response = confirm(client, account.auth, now_code(enrolment["secret"]))
        assert_error_body(response, 429)
        assert int(response.headers["Retry-After"]) > 0


def test_check_totp_limit_on_registration(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    limits = {"checkTotp": {"capacity": 3, "permit_seconds": 3600},
              "registration": {"capacity": 100, "permit_seconds": 1}}
    with custom_client(backend, tmp_path, request, rate_limits=limits) as client:
        account = register(client, NUMBER)
        enrolment = enrolled(client, account.auth)  # one permit
        for _ in range(2):
            response, _ = reregister(client, NUMBER, totp=wrong_code(enrolment["secret"]))
            assert response.status_code == 441
        response, _ = reregister(client, NUMBER, totp=now_code(enrolment["secret"]))
        assert_error_body(response, 429)
        assert "Retry-After" in response.headers
        assert client.get("/v1/accounts/whoami", headers=account.auth).status_code == 200


def test_check_totp_limit_on_remove(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    limits = {"checkTotp": {"capacity": 3, "permit_seconds": 3600}}
    with custom_client(backend, tmp_path, request, rate_limits=limits) as client:
        account = register(client, NUMBER)
        enrolment = enrolled(client, account.auth)
        for _ in range(2):
            assert remove(client, account.auth, wrong_code(enrolment["secret"])).status_code == 422
        assert_error_body(remove(client, account.auth, now_code(enrolment["secret"])), 429)


def test_codes_belong_to_their_account(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with custom_client(backend, tmp_path, request, rate_limits=GENEROUS) as client:
        first = register(client, NUMBER)
        second = register(client, "+15555550051")
        first_enrolment = enrolled(client, first.auth)
        enrolled(client, second.auth)
        response, _ = reregister(client, "+15555550051", totp=int(first_enrolment["backupCodes"][0]))
        assert_error_body(response, 441)
        response, _ = reregister(client, NUMBER, totp=int(first_enrolment["backupCodes"][0]))
        assert response.status_code == 200, response.text
