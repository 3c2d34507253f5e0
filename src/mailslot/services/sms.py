"""Delivery of verification codes by SMS or voice: console (development), webhook and Twilio."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Literal, Protocol

import httpx

from mailslot.config import RegistrationSettings

Transport = Literal["sms", "voice"]

log = logging.getLogger("mailslot.sms")


class SenderError(Exception):
    """The provider did not send the code. ``reason`` is one of the digest's 440 reasons."""

    def __init__(self, reason: str, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


class CodeSender(Protocol):
    async def send(
        self, number: str, code: str, transport: Transport, session_id: str, locale: str | None
    ) -> None: ...

    async def close(self) -> None: ...


def code_text(code: str) -> str:
    return f"Your Mailslot verification code: {code}"


class ConsoleSender:
    """Development provider: prints the code beside the session id (never the number) on stderr's log."""

    def __init__(self) -> None:
        self._log = logging.getLogger("mailslot.sms.console")

    async def send(
        self, number: str, code: str, transport: Transport, session_id: str, locale: str | None
    ) -> None:
        self._log.warning("verification code %s for session %s (%s)", code, session_id, transport)

    async def close(self) -> None:
        return None


class _HttpSender:
    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        self._client = client or httpx.AsyncClient(timeout=10.0)

    async def close(self) -> None:
        await self._client.aclose()

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.status_code < 300:
            return
        if response.status_code in (400, 404, 422):
            raise SenderError("providerRejected", permanent=True)
        if response.status_code == 429 or response.status_code >= 500:
            raise SenderError("providerUnavailable", permanent=False)
        raise SenderError("providerRejected", permanent=False)


class WebhookSender(_HttpSender):
    """POSTs ``{"number","code","transport","sessionId","locale"}`` as JSON to the operator's URL.

    When a secret is configured, the body's HMAC-SHA256 is sent in ``X-Mailslot-Signature`` so the
    receiver can tell the request came from this server.
    """

    def __init__(self, url: str, secret: str = "", client: httpx.AsyncClient | None = None) -> None:
        super().__init__(client)
        if not url:
            raise ValueError("registration.webhook_url must be set for the webhook provider")
        self.url = url
        self.secret = secret

    async def send(
        self, number: str, code: str, transport: Transport, session_id: str, locale: str | None
    ) -> None:
        body = json.dumps(
            {"number": number, "code": code, "transport": transport, "sessionId": session_id, "locale": locale}
        ).encode()
        headers = {"content-type": "application/json"}
        if self.secret:
            headers["x-mailslot-signature"] = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        try:
            response = await self._client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise SenderError("providerUnavailable", permanent=False) from exc
        self._raise_for(response)


class TwilioSender(_HttpSender):
    """Twilio's REST API: Messages for SMS, Calls with inline TwiML for voice."""

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        from_number: str,
        base_url: str = "https://api.twilio.com",
        client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(client)
        if not (account_sid and auth_token and from_number):
            raise ValueError("registration.twilio needs account_sid, auth_token and from_number")
        self.account_sid = account_sid
        self.auth = httpx.BasicAuth(account_sid, auth_token)
        self.from_number = from_number
        self.base_url = base_url.rstrip("/")

    async def send(
        self, number: str, code: str, transport: Transport, session_id: str, locale: str | None
    ) -> None:
        base = f"{self.base_url}/2010-04-01/Accounts/{self.account_sid}"
        if transport == "sms":
            url = f"{base}/Messages.json"
            form = {"To": number, "From": self.from_number, "Body": code_text(code)}
        else:
            spoken = ", ".join(code)
            url = f"{base}/Calls.json"
            form = {
                "To": number,
                "From": self.from_number,
                "Twiml": f"<Response><Say>Your verification code is {spoken}. Again: {spoken}.</Say></Response>",
            }
        try:
            response = await self._client.post(url, data=form, auth=self.auth)
        except httpx.HTTPError as exc:
            raise SenderError("providerUnavailable", permanent=False) from exc
        self._raise_for(response)


def build_sender(settings: RegistrationSettings) -> CodeSender:
    if settings.sms_provider == "webhook":
        return WebhookSender(settings.webhook_url, settings.webhook_secret)
    if settings.sms_provider == "twilio":
        tw = settings.twilio
        return TwilioSender(tw.account_sid, tw.auth_token, tw.from_number, tw.base_url)
    return ConsoleSender()
