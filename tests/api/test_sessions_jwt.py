"""JWT sessions (API.md §1.2): issue, use, rotate, reuse detection and revocation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient

from tests.api.foundation_support import (
    LOCK_TOKEN,
    add_linked_device,
    assert_error_body,
    custom_client,
    reregister,
)
from tests.helpers import basic, register

NUMBER = "+15555550040"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def issue(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    response = client.post("/v1/auth/session", headers=headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


def refresh(client: TestClient, token: str) -> Any:
    return client.post("/v1/auth/session/refresh", json={"refreshToken": token})


def whoami(client: TestClient, token: str) -> Any:
    return client.get("/v1/accounts/whoami", headers=bearer(token))


def test_issue_and_use_tokens(client: TestClient) -> None:
    account = register(client, NUMBER)
    tokens = issue(client, account.auth)
    assert set(tokens) == {"accessToken", "refreshToken", "expiresIn"}
    assert tokens["expiresIn"] == 3600
    assert tokens["accessToken"] != tokens["refreshToken"]
    response = whoami(client, tokens["accessToken"])
    assert response.status_code == 200, response.text
    assert response.json()["uuid"] == account.aci
    # Bearer works on other authenticated endpoints too.
    assert client.get("/v2/accounts/data_report", headers=bearer(tokens["accessToken"])).status_code == 200
    claims = jwt.decode(tokens["accessToken"], options={"verify_signature": False})
    assert claims["sub"] == account.aci and claims["dev"] == 1
    assert claims["exp"] - claims["iat"] == 3600
    assert "number" not in str(claims) and NUMBER not in str(claims)


def test_linked_device_gets_its_own_tokens(client: TestClient) -> None:
    account = register(client, NUMBER)
    linked = add_linked_device(client, account.aci, 3)
    tokens = issue(client, linked)
    assert jwt.decode(tokens["accessToken"], options={"verify_signature": False})["dev"] == 3
    response = client.put("/v1/accounts/registration_lock", json={"registrationLock": LOCK_TOKEN},
                          headers=bearer(tokens["accessToken"]))
    assert response.status_code == 403  # a token carries the device's rights, no more


def test_issue_needs_valid_basic_credentials(client: TestClient) -> None:
    account = register(client, NUMBER)
    tokens = issue(client, account.auth)
    for headers in ({}, basic(account.aci, "wrong"), bearer(tokens["accessToken"]),
                    {"Authorization": "Basic ???"}, basic(NUMBER, account.password)):
        response = client.post("/v1/auth/session", headers=headers)
        assert_error_body(response, 401)
        assert "WWW-Authenticate" in response.headers


def test_refresh_rotates(client: TestClient) -> None:
    account = register(client, NUMBER)
    first = issue(client, account.auth)
    response = refresh(client, first["refreshToken"])
    assert response.status_code == 200, response.text
    second = response.json()
    assert second["refreshToken"] != first["refreshToken"]
    assert whoami(client, second["accessToken"]).status_code == 200
    response = refresh(client, second["refreshToken"])
    assert response.status_code == 200
    third = response.json()
    assert whoami(client, third["accessToken"]).json()["uuid"] == account.aci


def test_reusing_a_spent_refresh_token_revokes_the_family(client: TestClient) -> None:
    account = register(client, NUMBER)
    first = issue(client, account.auth)
    other_family = issue(client, account.auth)
    second = refresh(client, first["refreshToken"]).json()
    third = refresh(client, second["refreshToken"]).json()

    response = refresh(client, first["refreshToken"])  # a copy of a spent token comes back
    assert_error_body(response, 401)
    assert_error_body(refresh(client, third["refreshToken"]), 401)  # the newest one dies with its family
    assert_error_body(refresh(client, second["refreshToken"]), 401)
    # Another family of the same device is untouched.
    assert refresh(client, other_family["refreshToken"]).status_code == 200


def test_token_kinds_are_not_interchangeable(client: TestClient) -> None:
    account = register(client, NUMBER)
    tokens = issue(client, account.auth)
    assert_error_body(refresh(client, tokens["accessToken"]), 401)
    assert_error_body(whoami(client, tokens["refreshToken"]), 401)
    # A token signed with another secret, or altered, is refused.
    forged = jwt.encode(jwt.decode(tokens["accessToken"], options={"verify_signature": False}), "x" * 32,
                        algorithm="HS256")
    assert_error_body(whoami(client, forged), 401)
    header, payload, signature = tokens["accessToken"].split(".")
    tampered = f"{header}.{payload}.{signature[:-4]}AAAA"
    assert_error_body(whoami(client, tampered), 401)
    assert refresh(client, tokens["refreshToken"]).status_code == 200


@pytest.mark.parametrize("body", [{}, {"refreshToken": ""}, {"refreshToken": 5}, [], {"refreshToken": "x" * 5000}])
def test_refresh_bad_body(client: TestClient, body: Any) -> None:
    assert_error_body(client.post("/v1/auth/session/refresh", json=body), 422)


def test_garbage_refresh_token_is_401(client: TestClient) -> None:
    assert_error_body(refresh(client, "not.a.jwt"), 401)


def test_reregistration_revokes_tokens_at_once(client: TestClient) -> None:
    account = register(client, NUMBER)
    tokens = issue(client, account.auth)
    response, _ = reregister(client, NUMBER)
    assert response.status_code == 200 and response.json()["uuid"] == account.aci
    assert_error_body(whoami(client, tokens["accessToken"]), 401)
    assert_error_body(refresh(client, tokens["refreshToken"]), 401)


def test_account_deletion_revokes_tokens_at_once(client: TestClient) -> None:
    account = register(client, NUMBER)
    tokens = issue(client, account.auth)
    assert client.delete("/v1/accounts/me", headers=bearer(tokens["accessToken"])).status_code == 204
    assert_error_body(whoami(client, tokens["accessToken"]), 401)
    assert_error_body(refresh(client, tokens["refreshToken"]), 401)
    # Even after the number is registered again (the ACI is new, the tokens stay dead).
    register(client, NUMBER)
    assert_error_body(whoami(client, tokens["accessToken"]), 401)


def test_registration_lock_freeze_revokes_tokens(client: TestClient) -> None:
    account = register(client, NUMBER, accountAttributes={"registrationLock": LOCK_TOKEN})
    tokens = issue(client, account.auth)
    response, _ = reregister(client, NUMBER)
    assert response.status_code == 423
    assert_error_body(whoami(client, tokens["accessToken"]), 401)
    assert_error_body(refresh(client, tokens["refreshToken"]), 401)


def test_expired_access_token_is_refused(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with custom_client(backend, tmp_path, request, auth={"access_token_seconds": -120}) as client:
        account = register(client, NUMBER)
        tokens = issue(client, account.auth)
        assert_error_body(whoami(client, tokens["accessToken"]), 401)


def test_expired_refresh_token_is_refused(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with custom_client(backend, tmp_path, request, auth={"refresh_token_seconds": -120}) as client:
        account = register(client, NUMBER)
        tokens = issue(client, account.auth)
        assert whoami(client, tokens["accessToken"]).status_code == 200
        assert_error_body(refresh(client, tokens["refreshToken"]), 401)


def test_configured_secret_signs_tokens(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    secret = "s" * 48
    with custom_client(backend, tmp_path, request, auth={"jwt_secret": secret}) as client:
        account = register(client, NUMBER)
        tokens = issue(client, account.auth)
        claims = jwt.decode(tokens["accessToken"], secret, algorithms=["HS256"], audience="mailslot-session")
        assert claims["sub"] == account.aci


def test_session_creation_is_rate_limited(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    limits = {"authSession": {"capacity": 2, "permit_seconds": 600}}
    with custom_client(backend, tmp_path, request, rate_limits=limits) as client:
        account = register(client, NUMBER)
        issue(client, account.auth)
        issue(client, account.auth)
        response = client.post("/v1/auth/session", headers=account.auth)
        assert_error_body(response, 429)
        assert int(response.headers["Retry-After"]) > 0
