"""Helpers shared by the foundation tests: custom-configured clients, store access, local HTTP servers."""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from mailslot.app import create_app
from mailslot.backends.sql import tables as t
from mailslot.crypto import tokenhash
from mailslot.services.container import Services
from mailslot.stores.models import Account
from tests.conftest import make_settings
from tests.helpers import Identity, TestAccount, b64, basic, registration_body, verified_session

T = TypeVar("T")

LOCK_TOKEN = "ab" * 32  # a 64-hex-character registration lock token
OTHER_LOCK_TOKEN = "cd" * 32


@contextmanager
def custom_client(backend: str, tmp_path: Path, request: pytest.FixtureRequest, **extra: Any) -> Iterator[TestClient]:
    """A client whose settings differ from the default fixture (rate limits, providers, body cap...)."""
    settings = make_settings(backend, tmp_path, request, **extra)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def services(client: TestClient) -> Services:
    svc: Services = client.app.state.services  # type: ignore[attr-defined]
    return svc


def call(client: TestClient, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run a coroutine function on the app's event loop (the stores' engine lives there)."""
    assert client.portal is not None
    return client.portal.call(fn, *args)


def account_by_number(client: TestClient, number: str) -> Account | None:
    return call(client, services(client).accounts.store.get_by_number, number)


def account_by_aci(client: TestClient, aci: str) -> Account | None:
    return call(client, services(client).accounts.store.get_by_aci, uuid.UUID(aci))


def add_linked_device(client: TestClient, aci: str, device_id: int = 2) -> dict[str, str]:
    """Insert a linked device row directly (device linking is another issue); returns its Basic header."""
    password = secrets.token_urlsafe(16)
    auth_hash, auth_salt = tokenhash.generate(password)
    store = services(client).accounts.store

    async def insert() -> None:
        async with store.db.write() as conn:  # type: ignore[attr-defined]
            await conn.execute(
                t.devices.insert().values(
                    aci=uuid.UUID(aci), device_id=device_id, auth_hash=auth_hash, auth_salt=auth_salt,
                    registration_id=77, pni_registration_id=78, name=None, fetches_messages=True,
                    capabilities="{}", created_at=int(time.time() * 1000), last_seen=0, user_agent=None,
                    gcm_token=None, apn_token=None, token_generation=secrets.token_hex(16),
                )
            )

    call(client, insert)
    store.invalidate(uuid.UUID(aci))  # written behind the account cache's back
    return basic(f"{aci}.{device_id}", password)


def rows_referencing(client: TestClient, value: uuid.UUID) -> dict[str, int]:
    """For every table of the schema, the rows whose UUID columns hold ``value``."""
    store = services(client).accounts.store

    async def count() -> dict[str, int]:
        found: dict[str, int] = {}
        async with store.db.read() as conn:  # type: ignore[attr-defined]
            for table in t.metadata.sorted_tables:
                columns = [c for c in table.columns if isinstance(c.type, sa.Uuid)]
                if not columns:
                    continue
                condition = sa.or_(*[c == value for c in columns])
                found[table.name] = int(
                    await conn.scalar(sa.select(sa.func.count()).select_from(table).where(condition)) or 0
                )
        return found

    return call(client, count)


@dataclass
class Registration:
    """Everything needed to send ``POST /v1/registration`` for one number."""

    number: str
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    aci_identity: Identity = field(default_factory=Identity.generate)
    pni_identity: Identity = field(default_factory=Identity.generate)
    uak: bytes = field(default_factory=lambda: secrets.token_bytes(16))

    def body(self, session_id: str | None, **overrides: Any) -> dict[str, Any]:
        return registration_body(session_id, self.aci_identity, self.pni_identity, self.uak, **overrides)

    @property
    def headers(self) -> dict[str, str]:
        return basic(self.number, self.password)

    def post(self, client: TestClient, session_id: str | None, **overrides: Any) -> Any:
        return client.post("/v1/registration", json=self.body(session_id, **overrides), headers=self.headers)

    def account(self, response: Any) -> TestAccount:
        data = response.json()
        return TestAccount(self.number, self.password, data["uuid"], data["pni"], self.aci_identity,
                           self.pni_identity, self.uak, extra={"response": data})


def reregister(client: TestClient, number: str, **overrides: Any) -> Any:
    """A fresh verified session and fresh keys for ``number``; returns the raw response."""
    reg = Registration(number)
    return reg.post(client, verified_session(client, number), **overrides), reg


def assert_error_body(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body.get("code"), str) and body["code"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    if code is not None:
        assert body["code"] == code, body
    return dict(body)


def random_b64(n: int) -> str:
    return b64(secrets.token_bytes(n))


# -- a local HTTP server for provider tests ----------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class LocalServer:
    """``http.server`` in a thread, answering every request with ``status`` and recording it."""

    def __init__(self, status: int = 200, reply: dict[str, Any] | None = None) -> None:
        self.status = status
        self.reply = reply if reply is not None else {"ok": True}
        self.requests: list[Recorded] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                owner.requests.append(
                    Recorded("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                payload = json.dumps(owner.reply).encode()
                self.send_response(owner.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LocalServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def closed_port_url() -> str:
    """A URL on which nothing listens."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    host, port = server.server_address[:2]
    server.server_close()
    return f"http://{host}:{port}/hook"
