"""Code delivery providers: console, webhook and Twilio, against real local HTTP servers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from urllib.parse import parse_qs

import pytest

from mailslot.config import RegistrationSettings, TwilioSettings
from mailslot.services.sms import (
    ConsoleSender,
    SenderError,
    TwilioSender,
    WebhookSender,
    build_sender,
    code_text,
)
from tests.api.foundation_support import LocalServer, closed_port_url

NUMBER = "+14155552671"
SESSION_ID = base64.urlsafe_b64encode(b"s" * 32).decode()


# -- console -------------------------------------------------------------------------------------


async def test_console_prints_code_and_session_but_never_the_number(caplog: pytest.LogCaptureFixture) -> None:
    sender = ConsoleSender()
    with caplog.at_level(logging.INFO):
        await sender.send(NUMBER, "482913", "sms", SESSION_ID, "en")
    await sender.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "482913" in lines[0] and SESSION_ID in lines[0]
    assert NUMBER not in lines[0] and "4155552671" not in lines[0]
    assert caplog.records[0].levelno >= logging.INFO
    assert not any("4155552671" in str(v) for v in caplog.records[0].__dict__.values())


# -- webhook -------------------------------------------------------------------------------------


async def test_webhook_posts_json() -> None:
    with LocalServer(status=204) as hook:
        sender = WebhookSender(hook.url + "/deliver")
        await sender.send(NUMBER, "123456", "voice", SESSION_ID, "de")
        await sender.close()
    [sent] = hook.requests
    assert sent.method == "POST" and sent.path == "/deliver"
    assert sent.headers["content-type"] == "application/json"
    assert json.loads(sent.body) == {
        "number": NUMBER, "code": "123456", "transport": "voice", "sessionId": SESSION_ID, "locale": "de",
    }
    assert "x-mailslot-signature" not in sent.headers


async def test_webhook_signs_the_body_when_a_secret_is_set() -> None:
    secret = "hook-secret"
    with LocalServer(status=200) as hook:
        sender = WebhookSender(hook.url + "/deliver", secret)
        await sender.send(NUMBER, "654321", "sms", SESSION_ID, None)
        await sender.close()
    [sent] = hook.requests
    expected = hmac.new(secret.encode(), sent.body, hashlib.sha256).hexdigest()
    assert sent.headers["x-mailslot-signature"] == expected
    wrong = hmac.new(b"other", sent.body, hashlib.sha256).hexdigest()
    assert sent.headers["x-mailslot-signature"] != wrong
    assert json.loads(sent.body)["locale"] is None


@pytest.mark.parametrize(
    ("status", "reason", "permanent"),
    [
        (500, "providerUnavailable", False),
        (502, "providerUnavailable", False),
        (503, "providerUnavailable", False),
        (429, "providerUnavailable", False),
        (400, "providerRejected", True),
        (422, "providerRejected", True),
        (403, "providerRejected", False),
    ],
)
async def test_webhook_failures(status: int, reason: str, permanent: bool) -> None:
    with LocalServer(status=status) as hook:
        sender = WebhookSender(hook.url + "/deliver")
        with pytest.raises(SenderError) as info:
            await sender.send(NUMBER, "123456", "sms", SESSION_ID, None)
        await sender.close()
    assert info.value.reason == reason and info.value.permanent is permanent
    assert len(hook.requests) == 1


async def test_webhook_unreachable() -> None:
    sender = WebhookSender(closed_port_url())
    with pytest.raises(SenderError) as info:
        await sender.send(NUMBER, "123456", "sms", SESSION_ID, None)
    await sender.close()
    assert info.value.reason == "providerUnavailable" and info.value.permanent is False


def test_webhook_needs_a_url() -> None:
    with pytest.raises(ValueError):
        WebhookSender("")


# -- Twilio --------------------------------------------------------------------------------------

SID = "AC0123456789abcdef0123456789abcdef"
TOKEN = "twilio-auth-token"
FROM = "+15005550006"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_twilio_sms() -> None:
    with LocalServer(status=201, reply={"sid": "SM1"}) as api:
        sender = TwilioSender(SID, TOKEN, FROM, base_url=api.url + "/")
        await sender.send(NUMBER, "123456", "sms", SESSION_ID, "en")
        await sender.close()
    [sent] = api.requests
    assert sent.path == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert sent.headers["authorization"] == _basic(SID, TOKEN)
    assert sent.headers["content-type"] == "application/x-www-form-urlencoded"
    form = {k: v[0] for k, v in parse_qs(sent.body.decode()).items()}
    assert form == {"To": NUMBER, "From": FROM, "Body": code_text("123456")}
    assert "123456" in form["Body"]


async def test_twilio_voice() -> None:
    with LocalServer(status=201, reply={"sid": "CA1"}) as api:
        sender = TwilioSender(SID, TOKEN, FROM, base_url=api.url)
        await sender.send(NUMBER, "908172", "voice", SESSION_ID, None)
        await sender.close()
    [sent] = api.requests
    assert sent.path == f"/2010-04-01/Accounts/{SID}/Calls.json"
    assert sent.headers["authorization"] == _basic(SID, TOKEN)
    form = {k: v[0] for k, v in parse_qs(sent.body.decode()).items()}
    assert set(form) == {"To", "From", "Twiml"}
    assert form["To"] == NUMBER and form["From"] == FROM
    assert form["Twiml"].startswith("<Response><Say>") and form["Twiml"].endswith("</Say></Response>")
    assert "9, 0, 8, 1, 7, 2" in form["Twiml"]


@pytest.mark.parametrize(("status", "reason"), [(500, "providerUnavailable"), (503, "providerUnavailable"),
                                                (400, "providerRejected")])
async def test_twilio_failures(status: int, reason: str) -> None:
    with LocalServer(status=status, reply={"code": 21211, "message": "invalid To"}) as api:
        sender = TwilioSender(SID, TOKEN, FROM, base_url=api.url)
        with pytest.raises(SenderError) as info:
            await sender.send(NUMBER, "123456", "sms", SESSION_ID, None)
        await sender.close()
    assert info.value.reason == reason
    assert info.value.permanent is (status < 500)


async def test_twilio_unreachable() -> None:
    sender = TwilioSender(SID, TOKEN, FROM, base_url=closed_port_url())
    with pytest.raises(SenderError) as info:
        await sender.send(NUMBER, "123456", "voice", SESSION_ID, None)
    await sender.close()
    assert info.value.reason == "providerUnavailable"


@pytest.mark.parametrize("missing", ["account_sid", "auth_token", "from_number"])
def test_twilio_needs_its_settings(missing: str) -> None:
    values = {"account_sid": SID, "auth_token": TOKEN, "from_number": FROM}
    values[missing] = ""
    with pytest.raises(ValueError):
        TwilioSender(**values)


# -- selection -----------------------------------------------------------------------------------


async def test_build_sender_follows_settings() -> None:
    assert isinstance(build_sender(RegistrationSettings()), ConsoleSender)
    webhook = build_sender(RegistrationSettings(sms_provider="webhook", webhook_url="http://127.0.0.1:9/x",
                                                webhook_secret="s"))
    assert isinstance(webhook, WebhookSender) and webhook.secret == "s"
    await webhook.close()
    twilio = build_sender(RegistrationSettings(
        sms_provider="twilio",
        twilio=TwilioSettings(account_sid=SID, auth_token=TOKEN, from_number=FROM, base_url="http://127.0.0.1:9/"),
    ))
    assert isinstance(twilio, TwilioSender) and twilio.base_url == "http://127.0.0.1:9"
    await twilio.close()
    with pytest.raises(ValueError):
        build_sender(RegistrationSettings(sms_provider="webhook"))
