"""Verification sessions (digest §1.1): create, read, update, request and submit codes."""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from fastapi.testclient import TestClient

from tests.api.foundation_support import LocalServer, assert_error_body, closed_port_url, custom_client

NUMBER = "+15555550010"
SESSION = "/v1/verification/session"


class Clock:
    def __init__(self) -> None:
        self.now = int(time.time())

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr("mailslot.services.verification._now", fake)
    return fake


def create(client: TestClient, number: str = NUMBER, **extra: Any) -> dict[str, Any]:
    response = client.post(SESSION, json={"number": number, **extra})
    assert response.status_code == 200, response.text
    return dict(response.json())


def request_code(client: TestClient, session_id: str, transport: str = "sms") -> Any:
    return client.post(f"{SESSION}/{session_id}/code", json={"transport": transport, "client": "android-2021-03"})


def submit(client: TestClient, session_id: str, code: str) -> Any:
    return client.put(f"{SESSION}/{session_id}/code", json={"code": code})


def unknown_session_id() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


# -- create --------------------------------------------------------------------------------------


def test_create_session_response_shape(client: TestClient) -> None:
    body = create(client)
    assert len(base64.urlsafe_b64decode(body["id"])) == 32
    assert body == {
        "id": body["id"], "nextSms": 0, "nextCall": 0, "nextVerificationAttempt": None,
        "allowedToRequestCode": True, "requestedInformation": [], "verified": False,
    }


def test_create_session_accepts_push_token_pair(client: TestClient) -> None:
    body = create(client, pushToken="token-1", pushTokenType="fcm")
    assert body["verified"] is False


@pytest.mark.parametrize("number", ["+1 415 555 2671", "+1 (415) 555-2671", "+1-415-555-2671"])
def test_create_session_non_normalised_number_is_400_with_both_forms(client: TestClient, number: str) -> None:
    response = client.post(SESSION, json={"number": number})
    assert response.status_code == 400, response.text
    assert response.json() == {"originalNumber": number, "normalizedNumber": "+14155552671"}


@pytest.mark.parametrize("number", ["hello", "", "+1", "+999999999999999999", "14155552671x", "+1415555267"])
def test_create_session_invalid_number_is_422(client: TestClient, number: str) -> None:
    assert_error_body(client.post(SESSION, json={"number": number}), 422)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"number": 14155552671},
        {"number": None},
        {"number": NUMBER, "pushToken": "t"},
        {"number": NUMBER, "pushTokenType": "fcm"},
        {"number": NUMBER, "pushToken": "t", "pushTokenType": "carrier-pigeon"},
        {"number": NUMBER, "mcc": "12345"},
    ],
)
def test_create_session_bad_body_is_422(client: TestClient, body: dict[str, Any]) -> None:
    assert_error_body(client.post(SESSION, json=body), 422)


def test_create_session_per_number_limit(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    limits = {"verificationSessionPerNumber": {"capacity": 2, "permit_seconds": 3600}}
    with custom_client(backend, tmp_path, request, rate_limits=limits) as client:
        create(client)
        create(client)
        response = client.post(SESSION, json={"number": NUMBER})
        assert_error_body(response, 429)
        assert int(response.headers["Retry-After"]) > 0
        create(client, "+15555550011")  # another number has its own bucket


# -- get / patch ---------------------------------------------------------------------------------


def test_get_session(client: TestClient) -> None:
    created = create(client)
    response = client.get(f"{SESSION}/{created['id']}")
    assert response.status_code == 200
    assert response.json() == created


def test_get_unknown_session_is_404(client: TestClient) -> None:
    assert_error_body(client.get(f"{SESSION}/{unknown_session_id()}"), 404)


@pytest.mark.parametrize("session_id", ["abc", "not-base64!!", base64.urlsafe_b64encode(b"short").decode(), "A" * 60])
def test_malformed_session_id_is_422(client: TestClient, session_id: str) -> None:
    assert_error_body(client.get(f"{SESSION}/{session_id}"), 422)
    assert_error_body(client.patch(f"{SESSION}/{session_id}", json={}), 422)
    assert_error_body(request_code(client, session_id), 422)
    assert_error_body(submit(client, session_id, "123456"), 422)


def test_session_expires(client: TestClient, clock: Clock) -> None:
    created = create(client)
    clock.now += 3601
    assert_error_body(client.get(f"{SESSION}/{created['id']}"), 404)


def test_patch_session(client: TestClient) -> None:
    created = create(client)
    response = client.patch(f"{SESSION}/{created['id']}", json={"pushToken": "abc", "pushTokenType": "apn"})
    assert response.status_code == 200, response.text
    assert response.json()["id"] == created["id"]
    response = client.patch(f"{SESSION}/{created['id']}", json={})
    assert response.status_code == 200


def test_patch_errors(client: TestClient) -> None:
    created = create(client)
    assert_error_body(client.patch(f"{SESSION}/{unknown_session_id()}", json={}), 404)
    assert_error_body(client.patch(f"{SESSION}/{created['id']}", json={"pushToken": "abc"}), 422)
    assert_error_body(client.patch(f"{SESSION}/{created['id']}", json={"pushTokenType": "xyz"}), 422)
    assert_error_body(client.patch(f"{SESSION}/{created['id']}", json=[1, 2]), 422)


# -- request a code ------------------------------------------------------------------------------


def test_request_code_then_resend_too_soon(client: TestClient, clock: Clock) -> None:
    session_id = create(client)["id"]
    response = request_code(client, session_id)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["nextSms"] == 60 and body["nextCall"] == 0 and body["nextVerificationAttempt"] == 0
    assert body["allowedToRequestCode"] is True and body["verified"] is False

    clock.now += 20
    response = request_code(client, session_id)
    assert response.status_code == 429, response.text
    assert response.headers["Retry-After"] == "40"
    assert response.json()["id"] == session_id and response.json()["nextSms"] == 40

    # Voice has its own timer.
    response = request_code(client, session_id, "voice")
    assert response.status_code == 200, response.text
    assert response.json()["nextCall"] == 60 and response.json()["nextSms"] == 40
    assert request_code(client, session_id, "voice").status_code == 429

    clock.now += 40
    assert client.get(f"{SESSION}/{session_id}").json()["nextSms"] == 0
    assert request_code(client, session_id).status_code == 200


def test_code_requests_are_bounded(client: TestClient, clock: Clock) -> None:
    session_id = create(client)["id"]
    for _ in range(5):
        assert request_code(client, session_id).status_code == 200
        clock.now += 61
    response = request_code(client, session_id)
    assert response.status_code == 429
    body = response.json()
    assert body["nextSms"] is None and body["nextCall"] is None
    assert body["allowedToRequestCode"] is False  # a new session is needed
    assert request_code(client, session_id, "voice").status_code == 429
    # The last code still verifies.
    assert submit(client, session_id, "123456").json()["verified"] is True


def test_request_code_unknown_session_404(client: TestClient) -> None:
    assert_error_body(request_code(client, unknown_session_id()), 404)


@pytest.mark.parametrize("body", [{}, {"transport": "pigeon"}, {"transport": 1}, {"transport": "sms", "client": 5}])
def test_request_code_bad_body_422(client: TestClient, body: dict[str, Any]) -> None:
    session_id = create(client)["id"]
    assert_error_body(client.post(f"{SESSION}/{session_id}/code", json=body), 422)


def test_request_code_on_verified_session_is_409(client: TestClient) -> None:
    session_id = create(client)["id"]
    assert request_code(client, session_id).status_code == 200
    assert submit(client, session_id, "123456").json()["verified"] is True
    response = request_code(client, session_id, "voice")
    assert response.status_code == 409
    assert response.json()["verified"] is True


# -- submit a code -------------------------------------------------------------------------------


def test_submit_code_without_request_is_409(client: TestClient) -> None:
    session_id = create(client)["id"]
    response = submit(client, session_id, "123456")
    assert response.status_code == 409, response.text
    assert response.json()["verified"] is False


def test_submit_code_unknown_session_404(client: TestClient) -> None:
    assert_error_body(submit(client, unknown_session_id(), "123456"), 404)


@pytest.mark.parametrize("body", [{}, {"code": ""}, {"code": "12a456"}, {"code": 123456}, {"code": "1" * 17}])
def test_submit_code_bad_body_422(client: TestClient, body: dict[str, Any]) -> None:
    session_id = create(client)["id"]
    request_code(client, session_id)
    assert_error_body(client.put(f"{SESSION}/{session_id}/code", json=body), 422)


def test_wrong_then_right_code(client: TestClient) -> None:
    session_id = create(client)["id"]
    request_code(client, session_id)
    response = submit(client, session_id, "654321")
    assert response.status_code == 200 and response.json()["verified"] is False
    response = submit(client, session_id, "123456")
    assert response.status_code == 200
    body = response.json()
    assert body["verified"] is True
    assert body["nextSms"] is None and body["nextCall"] is None and body["nextVerificationAttempt"] is None
    assert body["allowedToRequestCode"] is False
    assert client.get(f"{SESSION}/{session_id}").json()["verified"] is True


def test_code_expires_after_ten_minutes(client: TestClient, clock: Clock) -> None:
    fresh = create(client)["id"]
    request_code(client, fresh)
    clock.now += 599
    assert submit(client, fresh, "123456").json()["verified"] is True

    stale = create(client)["id"]
    request_code(client, stale)
    clock.now += 601
    response = submit(client, stale, "123456")
    assert response.status_code == 200
    assert response.json()["verified"] is False
    assert response.json()["nextVerificationAttempt"] is None
    # A new code works again.
    assert request_code(client, stale).status_code == 200
    assert submit(client, stale, "123456").json()["verified"] is True


def test_at_most_five_wrong_attempts(client: TestClient, clock: Clock) -> None:
    session_id = create(client)["id"]
    request_code(client, session_id)
    for _ in range(5):
        response = submit(client, session_id, "000000")
        assert response.status_code == 200 and response.json()["verified"] is False
    response = submit(client, session_id, "123456")  # even the right code is refused now
    assert response.status_code == 429, response.text
    assert response.json()["verified"] is False
    assert client.get(f"{SESSION}/{session_id}").json()["verified"] is False
    # A new code resets the count.
    clock.now += 61
    assert request_code(client, session_id).status_code == 200
    assert submit(client, session_id, "123456").json()["verified"] is True


def test_submit_after_verification_stays_verified(client: TestClient) -> None:
    session_id = create(client)["id"]
    request_code(client, session_id)
    assert submit(client, session_id, "123456").json()["verified"] is True
    response = submit(client, session_id, "000000")
    assert response.status_code in (200, 409)
    assert response.json()["verified"] is True


# -- provider failures (440) ---------------------------------------------------------------------

REAL_NUMBER = "+14155552671"


@pytest.mark.parametrize(
    ("status", "reason", "permanent"),
    [(503, "providerUnavailable", False), (500, "providerUnavailable", False), (400, "providerRejected", True)],
)
def test_provider_failure_is_440(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, status: int, reason: str, permanent: bool
) -> None:
    with LocalServer(status=status) as hook:
        registration = {"sms_provider": "webhook", "webhook_url": hook.url + "/hook"}
        with custom_client(backend, tmp_path, request, registration=registration) as client:
            session_id = create(client, REAL_NUMBER)["id"]
            response = request_code(client, session_id)
            assert response.status_code == 440, response.text
            assert response.json() == {"reason": reason, "permanentFailure": permanent}
            assert len(hook.requests) == 1
            # Nothing counted: the session may ask again at once.
            assert client.get(f"{SESSION}/{session_id}").json()["nextSms"] == 0


def test_unreachable_provider_is_440(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    registration = {"sms_provider": "webhook", "webhook_url": closed_port_url()}
    with custom_client(backend, tmp_path, request, registration=registration) as client:
        session_id = create(client, REAL_NUMBER)["id"]
        response = request_code(client, session_id)
        assert response.status_code == 440
        assert response.json() == {"reason": "providerUnavailable", "permanentFailure": False}


def test_working_webhook_delivers_code_that_verifies(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with LocalServer(status=200) as hook:
        registration = {"sms_provider": "webhook", "webhook_url": hook.url + "/hook"}
        with custom_client(backend, tmp_path, request, registration=registration) as client:
            session_id = create(client, REAL_NUMBER)["id"]
            assert request_code(client, session_id).status_code == 200
            sent = json.loads(hook.requests[0].body)
            assert sent["number"] == REAL_NUMBER and sent["sessionId"] == session_id
            assert sent["code"].isdigit() and len(sent["code"]) == 6
            wrong = f"{(int(sent['code']) + 1) % 1_000_000:06d}"
            assert submit(client, session_id, wrong).json()["verified"] is False
            assert submit(client, session_id, sent["code"]).json()["verified"] is True


def test_twilio_provider_end_to_end(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    sid = "AC" + "0" * 32
    with LocalServer(status=201, reply={"sid": "SM1"}) as api:
        registration = {"sms_provider": "twilio",
                        "twilio": {"account_sid": sid, "auth_token": "tok", "from_number": "+15005550006",
                                   "base_url": api.url}}
        with custom_client(backend, tmp_path, request, registration=registration) as client:
            session_id = create(client, REAL_NUMBER)["id"]
            response = client.post(f"{SESSION}/{session_id}/code", json={"transport": "voice"},
                                   headers={"Accept-Language": "de-DE,de;q=0.9"})
            assert response.status_code == 200, response.text
            assert request_code(client, session_id, "sms").status_code == 200
            call_request, sms_request = api.requests
            assert call_request.path == f"/2010-04-01/Accounts/{sid}/Calls.json"
            assert sms_request.path == f"/2010-04-01/Accounts/{sid}/Messages.json"
            form = {k: v[0] for k, v in parse_qs(sms_request.body.decode()).items()}
            assert form["To"] == REAL_NUMBER
            match = re.search(r"\b(\d{6})\b", form["Body"])
            assert match is not None
            assert submit(client, session_id, match.group(1)).json()["verified"] is True


# -- concurrency ---------------------------------------------------------------------------------


def _parallel(count: int, action: Any) -> list[Any]:
    barrier = threading.Barrier(count)
    results: list[Any] = []

    def run(index: int) -> None:
        barrier.wait()
        results.append(action(index))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_parallel_guesses_get_five_attempts_in_all(client: TestClient) -> None:
    """Guessing in parallel buys no extra attempts: only five codes are ever compared."""
    session_id = create(client)["id"]
    request_code(client, session_id)
    responses = _parallel(20, lambda i: submit(client, session_id, f"{900000 + i:06d}"))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 5 + [429] * 15, statuses
    assert all(not r.json()["verified"] for r in responses)
    assert submit(client, session_id, "123456").status_code == 429
    assert client.get(f"{SESSION}/{session_id}").json()["verified"] is False


def test_parallel_code_requests_send_one_code(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Parallel requests cannot skip the resend wait (no SMS pumping)."""
    with LocalServer(status=200) as hook:
        registration = {"sms_provider": "webhook", "webhook_url": hook.url + "/hook"}
        with custom_client(backend, tmp_path, request, registration=registration) as client:
            session_id = create(client, REAL_NUMBER)["id"]
            responses = _parallel(10, lambda i: request_code(client, session_id))
            statuses = sorted(r.status_code for r in responses)
            assert statuses == [200] + [429] * 9, statuses
            assert len(hook.requests) == 1
            code = json.loads(hook.requests[0].body)["code"]
            assert submit(client, session_id, code).json()["verified"] is True


def test_push_token_update_does_not_reset_attempts(client: TestClient) -> None:
    session_id = create(client)["id"]
    request_code(client, session_id)
    for _ in range(5):
        submit(client, session_id, "000000")
    response = client.patch(f"{SESSION}/{session_id}", json={"pushToken": "t", "pushTokenType": "fcm"})
    assert response.status_code == 200
    assert submit(client, session_id, "123456").status_code == 429
