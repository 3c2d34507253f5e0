"""Error answers (API.md §1.2 "errors"): always JSON ``{"code","message"}``, fields named, never a trace."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mailslot.app import create_app
from tests.api.foundation_support import Registration, assert_error_body, custom_client
from tests.conftest import make_settings
from tests.helpers import register, verified_session


def test_unknown_route_is_json_404(client: TestClient) -> None:
    for path in ("/nope", "/v1/accounts/nope", "/v9/registration"):
        body = assert_error_body(client.get(path), 404, "not_found")
        assert "Traceback" not in body["message"]


def test_wrong_method_is_json_405(client: TestClient) -> None:
    assert_error_body(client.get("/v1/registration"), 405, "method_not_allowed")
    assert_error_body(client.delete("/v1/accounts/whoami"), 405, "method_not_allowed")
    assert_error_body(client.post("/v2/config"), 405, "method_not_allowed")
    assert "GET" in client.post("/v2/config").headers["allow"]


def test_body_over_the_cap_is_json_413(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with custom_client(backend, tmp_path, request, server={"max_body_bytes": 16384}) as client:
        big = b'{"number":"' + b"1" * 17000 + b'"}'
        response = client.post("/v1/verification/session", content=big, headers={"content-type": "application/json"})
        assert_error_body(response, 413, "payload_too_large")

        # Without a Content-Length (chunked), the cap holds as the body streams in.
        def chunks() -> Iterator[bytes]:
            for _ in range(20):
                yield b"x" * 1000

        response = client.post("/v1/verification/session", content=chunks(),
                               headers={"content-type": "application/json"})
        assert_error_body(response, 413, "payload_too_large")

        # Below the cap, requests pass (a registration body is about 9 KiB).
        response = client.post("/v1/verification/session", json={"number": "+15555550001"})
        assert response.status_code == 200
        assert register(client).aci


def test_malformed_json_is_422_naming_the_body(client: TestClient) -> None:
    for raw in (b"{bad", b'{"number": "+15555550001"', b"", b"\xff\xfe", b"[1,]"):
        response = client.post("/v1/verification/session", content=raw, headers={"content-type": "application/json"})
        body = assert_error_body(response, 422, "invalid_request")
        assert body["message"].startswith("body"), body
        assert body["errors"][0]["field"] == "body", body


def test_validation_errors_name_the_field(client: TestClient) -> None:
    body = assert_error_body(client.post("/v1/verification/session", json={"number": 5}), 422)
    assert body["message"].startswith("number:")
    assert {"field": "number", "message": body["errors"][0]["message"]} in body["errors"]

    session_id = verified_session(client, "+15555550070")
    reg = Registration("+15555550070")
    response = reg.post(client, session_id, accountAttributes={"registrationId": "x"})
    body = assert_error_body(response, 422)
    assert [e["field"] for e in body["errors"]] == ["accountAttributes.registrationId"]
    response = reg.post(client, session_id, aciSignedPreKey={"keyId": 1, "publicKey": "!!", "signature": "AA"})
    body = assert_error_body(response, 422)
    assert "aciSignedPreKey.publicKey" in [e["field"] for e in body["errors"]]
    response = client.post("/v1/registration", json={}, headers=reg.headers)
    body = assert_error_body(response, 422)
    assert {"accountAttributes", "aciIdentityKey", "skipDeviceTransfer"} <= {e["field"] for e in body["errors"]}


def test_errors_do_not_echo_input(client: TestClient) -> None:
    secret = "s3cr3t-" + secrets.token_hex(8)
    response = client.post("/v1/verification/session", json={"number": {"nested": secret}})
    assert response.status_code == 422
    assert secret not in response.text


def test_nul_characters_never_reach_the_database(client: TestClient) -> None:
    """PostgreSQL refuses NUL in text: such input must be a 4xx, not a 500."""
    session_id = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    for path in (session_id + "%00", session_id[:10] + "%00" + session_id[10:], session_id + "!!!!"):
        assert_error_body(client.get(f"/v1/verification/session/{path}"), 422)
        assert_error_body(client.put(f"/v1/verification/session/{path}/code", json={"code": "1"}), 422)
    response = client.post("/v1/verification/session",
                           json={"number": "+15555550001", "pushToken": "a\u0000b", "pushTokenType": "fcm"})
    assert_error_body(response, 422)
    real = verified_session(client, "+15555550071")
    response = client.patch(f"/v1/verification/session/{real}", json={"pushToken": "\u0000", "pushTokenType": "apn"})
    assert_error_body(response, 422)

    reg = Registration("+15555550071")
    assert_error_body(reg.post(client, real + "\u0000"), 400)
    response = reg.post(client, real, accountAttributes={"fetchesMessages": False},
                        gcmToken={"gcmRegistrationId": "g\u0000"})
    assert_error_body(response, 422)

    account = register(client, "+15555550072")
    for kind in ("gcm", "apn"):
        response = client.put(f"/v1/accounts/{kind}/", json={f"{kind}RegistrationId": "t\u0000"}, headers=account.auth)
        assert_error_body(response, 422)
    response = client.put("/v1/accounts/attributes/", headers={**account.auth, "X-Signal-Agent": "OW\u0000D"}, json={
        "registrationId": 5, "pniRegistrationId": 5, "capabilities": {"spqr\u0000": True, "spqr": True},
    })
    assert response.status_code == 204
    assert client.get("/v1/accounts/whoami", headers=account.auth).status_code == 200


def test_unexpected_errors_are_json_500_without_a_trace(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    app = create_app(make_settings("sqlite", tmp_path, request))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail /work/main/src")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    body = assert_error_body(response, 500, "internal_error")
    assert "secret internal detail" not in response.text and "Traceback" not in response.text
    assert set(body) == {"code", "message"}
