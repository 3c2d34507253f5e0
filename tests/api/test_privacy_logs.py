"""Privacy of the server's logs (API.md §3, digest §14): no numbers, codes, passwords, tokens or bodies."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mailslot.observability.logging import QUIET_LOGGERS, JsonFormatter, configure_logging, truncate_ip
from tests.api.foundation_support import LOCK_TOKEN, Registration, custom_client
from tests.helpers import b64, basic, register, verified_session

TEST_NUMBER = "+15555550080"
REAL_NUMBER = "+14155552671"


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The server's own JSON log handler, writing to a buffer; the previous logging setup comes back after."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    saved_uvicorn = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate,
                            logging.getLogger(name).disabled)
                     for name in ("uvicorn", "uvicorn.error", "uvicorn.access")}
    saved_levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name, (handlers, propagate, disabled) in saved_uvicorn.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate
            logger.disabled = disabled
        for name, quiet_level in saved_levels.items():
            logging.getLogger(name).setLevel(quiet_level)


def server_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line is JSON (the test client's own httpx lines included: they are held to the same rule)."""
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def forbidden_in(text: str, needles: list[str]) -> list[str]:
    return [needle for needle in needles if needle and needle in text]


def number_forms(number: str) -> list[str]:
    digits = number.lstrip("+")
    return [number, digits, digits[1:], f"{digits[1:4]} {digits[4:7]}", "%2B" + digits]


def test_full_flow_logs_no_private_data(client: TestClient, log_stream: io.StringIO) -> None:
    account = register(client, TEST_NUMBER, accountAttributes={"registrationLock": LOCK_TOKEN})
    tokens = client.post("/v1/auth/session", headers=account.auth).json()
    bearer = {"Authorization": f"Bearer {tokens['accessToken']}"}
    assert client.get("/v1/accounts/whoami", headers=bearer).status_code == 200
    client.post("/v1/auth/session/refresh", json={"refreshToken": tokens["refreshToken"]})
    client.put("/v1/accounts/gcm/", json={"gcmRegistrationId": "gcm-token-" + "q" * 20}, headers=account.auth)
    client.get("/v2/accounts/data_report", headers=account.auth)
    client.head(f"/v1/accounts/account/{account.aci}")
    client.get("/v1/accounts/whoami", headers=basic(account.aci, "wrong-password-zz9"))
    client.post("/v1/verification/session", json={"number": "+1 415 555 2671"})  # an error that echoes nothing
    client.post("/v1/registration", json={"bad": "body-marker-77"}, headers=basic(TEST_NUMBER, "pw-marker-66"))
    totp = client.put("/v1/accounts/totp", headers=account.auth).json()
    locked = Registration(TEST_NUMBER)
    assert locked.post(client, verified_session(client, TEST_NUMBER)).status_code == 423
    client.delete("/v1/accounts/me", headers=account.auth)

    lines = server_lines(log_stream)
    assert any(line["logger"] == "mailslot.access" for line in lines), "the access log should be on"
    text = "\n".join(json.dumps(line) for line in lines)
    secrets_ = [
        *number_forms(TEST_NUMBER),
        "123456",  # the verification code
        account.password, locked.password, "wrong-password-zz9", "pw-marker-66",
        tokens["accessToken"], tokens["refreshToken"], tokens["accessToken"].split(".")[1],
        LOCK_TOKEN, totp["secret"], *totp["backupCodes"],
        "gcm-token-", "body-marker-77", b64(account.uak), b64(account.aci_identity.public),
        account.extra["response"]["pni"],
    ]
    leaked = forbidden_in(text, secrets_)
    assert not leaked, leaked
    for line in lines:
        if line["logger"] == "mailslot.access":
            assert "{" in line["route"] or line["route"].count("/") >= 1
            assert account.aci not in line["route"]  # templates, not raw paths
            assert line["net"] is None or line["net"].endswith(("/24", "/48"))


def test_console_provider_line_has_session_and_code_but_no_number(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, log_stream: io.StringIO
) -> None:
    with custom_client(backend, tmp_path, request, registration={"sms_provider": "console"}) as client:
        session_id = client.post("/v1/verification/session", json={"number": REAL_NUMBER}).json()["id"]
        response = client.post(f"/v1/verification/session/{session_id}/code", json={"transport": "sms"})
        assert response.status_code == 200, response.text

        lines = server_lines(log_stream)
        console = [line for line in lines if line["logger"].startswith("mailslot.sms")]
        assert len(console) == 1, console
        message = console[0]["msg"]
        assert session_id in message
        match = re.search(r"\b(\d{6})\b", message)
        assert match is not None, message
        code = match.group(1)
        assert not forbidden_in(json.dumps(console[0]), number_forms(REAL_NUMBER))

        # The code from the console works, and a full registration with the real number follows.
        assert client.put(f"/v1/verification/session/{session_id}/code", json={"code": code}).json()["verified"]
        reg = Registration(REAL_NUMBER)
        response = reg.post(client, session_id)
        assert response.status_code == 200, response.text
        client.get("/v1/accounts/whoami", headers=basic(response.json()["uuid"], reg.password))

        lines = server_lines(log_stream)
        others = "\n".join(json.dumps(line) for line in lines if not line["logger"].startswith("mailslot.sms"))
        assert not forbidden_in(others, [code, reg.password, *number_forms(REAL_NUMBER)])


def test_json_formatter_keeps_only_the_exception_type(log_stream: io.StringIO) -> None:
    log = logging.getLogger("mailslot.test")
    try:
        raise ValueError("+15555550080 secret detail")
    except ValueError:
        log.exception("failed")
    [line] = [json.loads(raw) for raw in log_stream.getvalue().splitlines() if '"mailslot.test"' in raw]
    assert line["exc_type"] == "ValueError" and line["msg"] == "failed"
    assert "secret detail" not in log_stream.getvalue() and "5555550080" not in log_stream.getvalue()
    assert JsonFormatter().format(logging.makeLogRecord({"msg": "x"})).startswith("{")


@pytest.mark.parametrize(
    ("address", "expected"),
    [("203.0.113.77", "203.0.113.0/24"), ("2001:db8:1234:5678::1", "2001:db8:1234::/48"), ("testclient", None),
     (None, None), ("", None)],
)
def test_truncate_ip(address: str | None, expected: str | None) -> None:
    assert truncate_ip(address) == expected


def test_chatty_libraries_stay_quiet_at_debug(log_stream: io.StringIO) -> None:
    """Database drivers and HTTP clients quote parameters and URLs at DEBUG/INFO; they must not."""
    assert logging.getLogger().isEnabledFor(logging.DEBUG)
    for name in ("aiosqlite", "asyncpg", "sqlalchemy.engine.Engine", "httpx", "httpcore", "websockets"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
