"""Linked devices (digest §3, §5.1; issue 5) on SQLite and PostgreSQL: link tokens, linking, the device list,
removal, capabilities and names, and the fan-out of messages to every device of an account."""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

import mailslot.services.devices as devices_module
from mailslot.backends.sql import tables as t
from mailslot.crypto import xeddsa
from mailslot.protocol.envelope_pb2 import Envelope
from mailslot.protocol.websocket_pb2 import WebSocketMessage
from tests.api.delivery_support import Device, message, pending, receive_frame, send, wait_until
from tests.api.foundation_support import call, custom_client, services
from tests.helpers import Identity, TestAccount, b64, basic, register

ALICE, BOB, CAROL = "+15555550091", "+15555550092", "+15555550093"
GENEROUS = {"allocateDevice": {"capacity": 100, "permit_seconds": 1},
            "verifyDevice": {"capacity": 100, "permit_seconds": 1}}


@dataclass
class Linked:
    account: TestAccount
    device_id: int
    password: str
    registration_id: int
    pni_registration_id: int

    @property
    def auth(self) -> dict[str, str]:
        return basic(f"{self.account.aci}.{self.device_id}", self.password)


def provisioning_code(client: TestClient, auth: dict[str, str]) -> Any:
    return client.get("/v1/devices/provisioning/code", headers=auth)


def new_code(client: TestClient, account: TestAccount) -> str:
    response = provisioning_code(client, account.auth)
    assert response.status_code == 200, response.text
    return str(response.json()["verificationCode"])


def link_body(account: TestAccount, code: str, registration_id: int = 2001, name: bytes = b"desktop") -> dict[str, Any]:
    return {
        "verificationCode": code,
        "accountAttributes": {
            "fetchesMessages": True,
            "registrationId": registration_id,
            "pniRegistrationId": registration_id + 1000,
            "name": b64(name),
            "capabilities": {"spqr": True, "storage": True},
        },
        "aciSignedPreKey": account.aci_identity.signed_ec(11),
        "aciPqLastResortPreKey": account.aci_identity.signed_kem(12),
        "pniSignedPreKey": account.pni_identity.signed_ec(13),
        "pniPqLastResortPreKey": account.pni_identity.signed_kem(14),
    }


def put_link(client: TestClient, account: TestAccount, body: dict[str, Any], password: str = "new-device-pw") -> Any:
    """``PUT /v1/devices/link``: only the Basic password (the new device's) matters."""
    return client.put("/v1/devices/link", json=body, headers=basic(account.number, password))


def link_device(client: TestClient, account: TestAccount, registration_id: int = 2001) -> Linked:
    password = secrets.token_urlsafe(18)
    response = put_link(client, account, link_body(account, new_code(client, account), registration_id), password)
    assert response.status_code == 200, response.text
    return Linked(account, response.json()["deviceId"], password, registration_id, registration_id + 1000)


def device_ids(client: TestClient, account: TestAccount) -> list[int]:
    response = client.get("/v1/devices", headers=account.auth)
    assert response.status_code == 200, response.text
    return [d["id"] for d in response.json()["devices"]]


def whoami(client: TestClient, auth: dict[str, str]) -> int:
    return client.get("/v1/accounts/whoami", headers=auth).status_code


def device_rows(client: TestClient, aci: str, device_id: int) -> dict[str, int]:
    """Rows of each per-device table that belong to (aci, device_id)."""
    store = services(client).accounts.store

    async def count() -> dict[str, int]:
        found = {}
        async with store.db.read() as conn:  # type: ignore[attr-defined]
            for table in t.DEVICE_TABLES:
                condition = sa.and_(table.c.aci == uuid.UUID(aci), table.c.device_id == device_id)
                found[table.name] = int(
                    await conn.scalar(sa.select(sa.func.count()).select_from(table).where(condition)) or 0
                )
        return found

    return call(client, count)


def stored_device(client: TestClient, aci: str, device_id: int) -> Any:
    account = call(client, services(client).accounts.store.get_by_aci, uuid.UUID(aci))
    assert account is not None
    return account.device(device_id)


def closed_with(ws: WebSocketTestSession, timeout: float = 5.0) -> int:
    """Read (and answer) frames until the server closes the socket; its close code."""
    device = Device(ws)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "the socket did not close"
        try:
            frame = receive_frame(ws, remaining)
        except WebSocketDisconnect as closed:
            return closed.code
        except TimeoutError:
            raise AssertionError("the socket did not close") from None
        if frame.type == WebSocketMessage.REQUEST:
            device.answer(frame.request)


class Shifted:
    """Stands in for the ``time`` module of the device service: the wall clock moved by ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.monotonic = time.monotonic

    def time(self) -> float:
        return _wall_clock() + self.seconds


_wall_clock = time.time


@pytest.fixture
def alice(client: TestClient) -> TestAccount:
    return register(client, ALICE)


# -- provisioning codes --------------------------------------------------------------------------------


def test_provisioning_code_is_an_hmac_token_for_the_primary_only(client: TestClient, alice: TestAccount) -> None:
    response = provisioning_code(client, alice.auth)
    assert response.status_code == 200, response.text
    body = response.json()
    token = body["verificationCode"]
    claims, _, mac = token.rpartition(":")
    aci, _, issued = claims.partition(".")
    assert aci == alice.aci
    assert abs(int(issued) - time.time() * 1000) < 60_000
    assert len(base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4))) == 32, "HMAC-SHA256"
    expected_identifier = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).decode().rstrip("=")
    assert body["tokenIdentifier"] == expected_identifier

    linked = link_device(client, alice)
    assert provisioning_code(client, linked.auth).status_code == 401
    assert provisioning_code(client, {}).status_code == 401


def test_provisioning_code_allocation_is_rate_limited(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    limits = {"allocateDevice": {"capacity": 2, "permit_seconds": 3600}}
    with custom_client(backend, tmp_path, request, rate_limits=limits) as client:
        alice = register(client, ALICE)
        bob = register(client, BOB)
        assert provisioning_code(client, alice.auth).status_code == 200
        assert provisioning_code(client, alice.auth).status_code == 200
        limited = provisioning_code(client, alice.auth)
        assert limited.status_code == 429, limited.text
        assert int(limited.headers["Retry-After"]) > 0
        assert provisioning_code(client, bob.auth).status_code == 200, "the limit is per account"


# -- linking -------------------------------------------------------------------------------------------


def test_link_adds_a_device_that_authenticates_with_its_password(client: TestClient, alice: TestAccount) -> None:
    code = new_code(client, alice)
    body = link_body(alice, code, registration_id=2222, name=b"laptop")
    response = put_link(client, alice, body, password="the-new-password")
    assert response.status_code == 200, response.text
    assert response.json() == {"uuid": alice.aci, "pni": alice.pni, "deviceId": 2}

    linked_auth = basic(f"{alice.aci}.2", "the-new-password")
    me = client.get("/v1/accounts/whoami", headers=linked_auth)
    assert me.status_code == 200 and me.json()["uuid"] == alice.aci
    assert whoami(client, basic(f"{alice.aci}.2", "not-the-password")) == 401
    assert whoami(client, basic(f"{alice.aci}.1", "the-new-password")) == 401, "the primary's password is its own"
    assert whoami(client, alice.auth) == 200

    device = stored_device(client, alice.aci, 2)
    assert (device.registration_id, device.pni_registration_id) == (2222, 3222)
    assert device.name == b"laptop" and device.fetches_messages is True
    assert device.capabilities == {"spqr": True, "storage": True}
    keys = {k.identity: k for k in call(client, services(client).accounts.store.get_device_keys,
                                        uuid.UUID(alice.aci), 2)}
    assert set(keys) == {"aci", "pni"}
    assert b64(keys["aci"].signed_pre_key.public_key) == body["aciSignedPreKey"]["publicKey"]
    assert b64(keys["aci"].last_resort_pre_key.public_key) == body["aciPqLastResortPreKey"]["publicKey"]
    assert b64(keys["pni"].signed_pre_key.public_key) == body["pniSignedPreKey"]["publicKey"]
    assert b64(keys["pni"].last_resort_pre_key.public_key) == body["pniPqLastResortPreKey"]["publicKey"]


def test_link_without_a_password_is_401(client: TestClient, alice: TestAccount) -> None:
    response = client.put("/v1/devices/link", json=link_body(alice, new_code(client, alice)))
    assert response.status_code == 401
    assert device_ids(client, alice) == [1]


def test_link_token_is_single_use(client: TestClient, alice: TestAccount) -> None:
    code = new_code(client, alice)
    assert put_link(client, alice, link_body(alice, code)).status_code == 200
    again = put_link(client, alice, link_body(alice, code, registration_id=2002), password="other")
    assert again.status_code == 403, again.text
    assert device_ids(client, alice) == [1, 2]


def test_link_token_expires_after_ten_minutes(
    client: TestClient, alice: TestAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    almost, late = new_code(client, alice), new_code(client, alice)
    monkeypatch.setattr(devices_module, "time", Shifted(590))
    assert put_link(client, alice, link_body(alice, almost)).status_code == 200, "still valid at 9m50s"
    monkeypatch.setattr(devices_module, "time", Shifted(610))
    expired = put_link(client, alice, link_body(alice, late, registration_id=2002))
    assert expired.status_code == 403, expired.text
    assert device_ids(client, alice) == [1, 2]
    monkeypatch.setattr(devices_module, "time", Shifted(0))
    # The refusal did not consume the token: only its age did.
    assert put_link(client, alice, link_body(alice, late, registration_id=2002)).status_code == 200


def test_tampered_and_foreign_tokens_are_403(client: TestClient, alice: TestAccount) -> None:
    bob = register(client, BOB)
    code = new_code(client, alice)
    claims, _, mac = code.rpartition(":")
    aci, _, issued = claims.partition(".")
    flipped = ("A" if mac[0] != "A" else "B") + mac[1:]
    forged = [
        f"{claims}:{flipped}",  # MAC altered
        f"{aci}.{int(issued) + 1}:{mac}",  # issue time altered
        f"{bob.aci}.{issued}:{mac}",  # Alice's MAC on Bob's account
        claims,  # no MAC at all
        "garbage",
    ]
    for token in forged:
        response = put_link(client, bob, link_body(bob, token))
        assert response.status_code == 403, (token, response.text)
        response = put_link(client, alice, link_body(alice, token))
        assert response.status_code == 403, (token, response.text)
    assert device_ids(client, alice) == [1] and device_ids(client, bob) == [1]
    # A token issued to Alice links to Alice's account only, whatever the Basic username says.
    response = put_link(client, bob, link_body(alice, code))
    assert response.status_code == 200 and response.json()["uuid"] == alice.aci
    assert device_ids(client, bob) == [1] and device_ids(client, alice) == [1, 2]


@pytest.mark.parametrize(
    "field",
    ["aciSignedPreKey", "aciPqLastResortPreKey", "pniSignedPreKey", "pniPqLastResortPreKey"],
)
def test_keys_not_signed_by_the_account_identity_are_422(client: TestClient, alice: TestAccount, field: str) -> None:
    code = new_code(client, alice)
    body = link_body(alice, code)
    stranger = Identity.generate()
    body[field] = stranger.signed_kem(5) if "Pq" in field else stranger.signed_ec(5)
    response = put_link(client, alice, body)
    assert response.status_code == 422, response.text
    assert device_ids(client, alice) == [1]
    assert device_rows(client, alice.aci, 2)["signed_keys"] == 0
    # Keys of the other identity of the same account do not do either.
    crossed = link_body(alice, code)
    crossed["pniSignedPreKey"] = alice.aci_identity.signed_ec(13)
    assert put_link(client, alice, crossed).status_code == 422
    # The refused attempts left the token usable.
    assert put_link(client, alice, link_body(alice, code)).status_code == 200


def test_pni_keys_are_required_when_the_account_has_a_pni_identity(client: TestClient, alice: TestAccount) -> None:
    code = new_code(client, alice)
    for missing in ["pniSignedPreKey", "pniPqLastResortPreKey"]:
        body = link_body(alice, code)
        del body[missing]
        assert put_link(client, alice, body).status_code == 422, missing
    body = link_body(alice, code)
    del body["accountAttributes"]["pniRegistrationId"]
    assert put_link(client, alice, body).status_code == 422
    assert device_ids(client, alice) == [1]


def test_pni_keys_are_refused_when_the_account_has_no_pni_identity(client: TestClient, alice: TestAccount) -> None:
    store = services(client).accounts.store

    async def drop_pni_identity() -> None:
        async with store.db.write() as conn:  # type: ignore[attr-defined]
            await conn.execute(
                t.accounts.update().where(t.accounts.c.aci == uuid.UUID(alice.aci)).values(pni_identity_key=None)
            )

    call(client, drop_pni_identity)
    store.invalidate(uuid.UUID(alice.aci))  # written behind the account cache's back
    code = new_code(client, alice)
    assert put_link(client, alice, link_body(alice, code)).status_code == 422
    body = link_body(alice, code)
    for name in ["pniSignedPreKey", "pniPqLastResortPreKey"]:
        del body[name]
    del body["accountAttributes"]["pniRegistrationId"]
    response = put_link(client, alice, body)
    assert response.status_code == 200, response.text
    keys = call(client, store.get_device_keys, uuid.UUID(alice.aci), 2)
    assert [k.identity for k in keys] == ["aci"]


def test_capabilities_and_push_channel_are_validated(client: TestClient, alice: TestAccount) -> None:
    code = new_code(client, alice)
    no_spqr = link_body(alice, code)
    no_spqr["accountAttributes"]["capabilities"] = {"storage": True}
    assert put_link(client, alice, no_spqr).status_code == 422
    spqr_off = link_body(alice, code)
    spqr_off["accountAttributes"]["capabilities"] = {"spqr": False}
    assert put_link(client, alice, spqr_off).status_code == 422
    no_capabilities = link_body(alice, code)
    del no_capabilities["accountAttributes"]["capabilities"]
    assert put_link(client, alice, no_capabilities).status_code == 422
    fetching_with_token = link_body(alice, code)
    fetching_with_token["gcmToken"] = {"gcmRegistrationId": "token123"}
    assert put_link(client, alice, fetching_with_token).status_code == 422
    fetching_with_apn = link_body(alice, code)
    fetching_with_apn["apnToken"] = {"apnRegistrationId": "token123"}
    assert put_link(client, alice, fetching_with_apn).status_code == 422
    no_channel = link_body(alice, code)
    no_channel["accountAttributes"]["fetchesMessages"] = False
    assert put_link(client, alice, no_channel).status_code == 422
    long_name = link_body(alice, code, name=b"n" * 226)
    assert put_link(client, alice, long_name).status_code == 422
    assert device_ids(client, alice) == [1]
    pushed = link_body(alice, code, name=b"n" * 225)
    pushed["accountAttributes"]["fetchesMessages"] = False
    pushed["gcmToken"] = {"gcmRegistrationId": "token123"}
    assert put_link(client, alice, pushed).status_code == 200
    assert stored_device(client, alice.aci, 2).gcm_token == "token123"


def test_six_devices_at_most(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with custom_client(backend, tmp_path, request, rate_limits=GENEROUS) as client:
        alice = register(client, ALICE)
        for n in range(4):
            link_device(client, alice, registration_id=2001 + n)
        spare = new_code(client, alice)  # issued at five devices, used at six
        link_device(client, alice, registration_id=2005)
        assert device_ids(client, alice) == [1, 2, 3, 4, 5, 6]
        full = provisioning_code(client, alice.auth)
        assert full.status_code == 411, full.text
        assert full.json() == {"current": 6, "max": 6}
        refused = put_link(client, alice, link_body(alice, spare, registration_id=2006))
        assert refused.status_code == 411, refused.text
        assert refused.json() == {"current": 6, "max": 6}
        assert device_ids(client, alice) == [1, 2, 3, 4, 5, 6]
        # Removing one makes room again.
        assert client.delete("/v1/devices/4", headers=alice.auth).status_code == 204
        assert link_device(client, alice, registration_id=2007).device_id == 4


def test_lowest_free_device_id_is_reused(client: TestClient, alice: TestAccount) -> None:
    assert [link_device(client, alice, 2001 + n).device_id for n in range(3)] == [2, 3, 4]
    assert client.delete("/v1/devices/3", headers=alice.auth).status_code == 204
    assert link_device(client, alice, 2010).device_id == 3
    assert client.delete("/v1/devices/2", headers=alice.auth).status_code == 204
    assert link_device(client, alice, 2011).device_id == 2
    assert device_ids(client, alice) == [1, 2, 3, 4]


def test_concurrent_links_get_distinct_ids(client: TestClient, alice: TestAccount) -> None:
    codes = [new_code(client, alice) for _ in range(3)]
    results: list[Any] = [None] * len(codes)

    def link(index: int) -> None:
        results[index] = put_link(client, alice, link_body(alice, codes[index], 2001 + index), f"pw{index}")

    threads = [threading.Thread(target=link, args=(i,), daemon=True) for i in range(len(codes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert all(r is not None and r.status_code == 200 for r in results), results
    assert sorted(r.json()["deviceId"] for r in results) == [2, 3, 4]
    assert device_ids(client, alice) == [1, 2, 3, 4]
    for index, response in enumerate(results):
        assert whoami(client, basic(f"{alice.aci}.{response.json()['deviceId']}", f"pw{index}")) == 200


def test_linking_is_rate_limited(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    limits = {"verifyDevice": {"capacity": 1, "permit_seconds": 3600}}
    with custom_client(backend, tmp_path, request, rate_limits=limits) as client:
        alice = register(client, ALICE)
        link_device(client, alice)
        limited = put_link(client, alice, link_body(alice, new_code(client, alice), registration_id=2002))
        assert limited.status_code == 429, limited.text
        assert device_ids(client, alice) == [1, 2]


# -- waiting for the link -------------------------------------------------------------------------------


def test_wait_for_linked_device_wakes_when_the_link_completes(client: TestClient, alice: TestAccount) -> None:
    code = provisioning_code(client, alice.auth).json()
    path = f"/v1/devices/wait_for_linked_device/{code['tokenIdentifier']}"
    outcome: dict[str, Any] = {}

    def wait() -> None:
        outcome["response"] = client.get(f"{path}?timeout=5", headers=alice.auth)
        outcome["at"] = time.monotonic()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive(), "the wait returned before anything was linked"
    response = put_link(client, alice, link_body(alice, code["verificationCode"], registration_id=2345, name=b"pc"))
    assert response.status_code == 200, response.text
    linked_at = time.monotonic()
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert outcome["at"] - linked_at < 2.0, "the wait should end as the link completes"
    info = outcome["response"]
    assert info.status_code == 200, info.text
    assert info.json()["id"] == 2
    assert info.json()["registrationId"] == 2345
    assert info.json()["name"] == b64(b"pc")
    # After the fact the answer is immediate (3600 is the largest allowed timeout).
    again = client.get(f"{path}?timeout=3600", headers=alice.auth)
    assert again.status_code == 200 and again.json()["id"] == 2


def test_wait_for_linked_device_times_out_with_204(client: TestClient, alice: TestAccount) -> None:
    code = provisioning_code(client, alice.auth).json()
    path = f"/v1/devices/wait_for_linked_device/{code['tokenIdentifier']}"
    started = time.monotonic()
    response = client.get(f"{path}?timeout=1", headers=alice.auth)
    assert response.status_code == 204
    assert 0.9 <= time.monotonic() - started < 5
    for bad in ["0", "3601", "-1", "soon"]:
        assert client.get(f"{path}?timeout={bad}", headers=alice.auth).status_code == 422, bad
    assert client.get(f"{path}?timeout=1").status_code == 401


# -- the device list and removal ----------------------------------------------------------------------


def test_list_devices(client: TestClient, alice: TestAccount) -> None:
    linked = link_device(client, alice, registration_id=2500)
    for auth in (alice.auth, linked.auth):
        response = client.get("/v1/devices", headers=auth)
        assert response.status_code == 200, response.text
        listed = {d["id"]: d for d in response.json()["devices"]}
        assert sorted(listed) == [1, 2]
        assert listed[1]["registrationId"] == 1234 and listed[2]["registrationId"] == 2500
        assert listed[2]["name"] == b64(b"desktop")
        assert listed[2]["lastSeen"] % 86_400_000 == 0, "day granular"
    assert client.get("/v1/devices").status_code == 401


def test_primary_removes_a_linked_device_and_everything_it_owns(client: TestClient, alice: TestAccount) -> None:
    linked = link_device(client, alice)
    carol = register(client, CAROL)
    # Give device 2 a queued message, one-time keys and a refresh token.
    sent = send(client, carol, alice, message(b"one", 1, 1234), message(b"two", 2, linked.registration_id))
    assert sent.status_code == 200, sent.text
    prekeys = {
        "preKeys": [{"keyId": 21, "publicKey": b64(xeddsa.generate_keypair()[1])}],
        "pqPreKeys": [alice.aci_identity.signed_kem(22)],
    }
    assert client.put("/v2/keys", json=prekeys, headers=linked.auth).status_code == 204
    assert client.post("/v1/auth/session", headers=linked.auth).status_code == 200
    before = device_rows(client, alice.aci, 2)
    assert all(before[name] >= 1 for name in before), before
    primary_rows = device_rows(client, alice.aci, 1)

    with client.websocket_connect("/v1/websocket/", headers=linked.auth) as ws:
        response = client.delete("/v1/devices/2", headers=alice.auth)
        assert response.status_code == 204, response.text
        assert closed_with(ws) == 4401
    assert device_rows(client, alice.aci, 2) == {name: 0 for name in before}
    assert device_rows(client, alice.aci, 1) == primary_rows, "the primary keeps what is its own"
    assert whoami(client, linked.auth) == 401
    assert device_ids(client, alice) == [1]
    assert client.delete("/v1/devices/2", headers=alice.auth).status_code == 404


def test_linked_device_removes_itself(client: TestClient, alice: TestAccount) -> None:
    linked = link_device(client, alice)
    with client.websocket_connect("/v1/websocket/", headers=linked.auth) as ws:
        assert client.delete("/v1/devices/2", headers=linked.auth).status_code == 204
        assert closed_with(ws) == 4401
    assert whoami(client, linked.auth) == 401
    assert device_ids(client, alice) == [1]
    assert sum(device_rows(client, alice.aci, 2).values()) == 0


def test_linked_device_cannot_remove_others_nor_the_primary(client: TestClient, alice: TestAccount) -> None:
    second, third = link_device(client, alice, 2001), link_device(client, alice, 2002)
    assert client.delete("/v1/devices/3", headers=second.auth).status_code == 401
    # Signal-Server's DeviceController checks the caller first: a linked device removing anything but itself
    # is 401, before the 403 that guards device 1 against the primary itself.
    assert client.delete("/v1/devices/1", headers=second.auth).status_code == 401
    assert client.delete("/v1/devices/1", headers=alice.auth).status_code == 403, "nobody removes the primary"
    assert client.delete("/v1/devices/9", headers=alice.auth).status_code == 404
    assert client.delete("/v1/devices/2").status_code == 401
    assert device_ids(client, alice) == [1, 2, 3]
    assert whoami(client, alice.auth) == 200 and whoami(client, third.auth) == 200


# -- capabilities and names ---------------------------------------------------------------------------


def test_capabilities_are_replaced_for_the_calling_device(client: TestClient, alice: TestAccount) -> None:
    linked = link_device(client, alice)
    response = client.put("/v1/devices/capabilities", json={"spqr": True, "transfer": True}, headers=linked.auth)
    assert response.status_code == 204, response.text
    assert stored_device(client, alice.aci, 2).capabilities == {"spqr": True, "transfer": True}
    assert stored_device(client, alice.aci, 1).capabilities == {"spqr": True, "storage": True}
    assert client.put("/v1/devices/capabilities", json={"spqr": True}, headers=linked.auth).status_code == 204
    assert stored_device(client, alice.aci, 2).capabilities == {"spqr": True}
    assert client.put("/v1/devices/capabilities", json={"spqr": True}).status_code == 401


def test_device_names(client: TestClient, alice: TestAccount) -> None:
    second, third = link_device(client, alice, 2001), link_device(client, alice, 2002)

    def rename(auth: dict[str, str], name: bytes, device_id: int | None = None) -> int:
        query = "" if device_id is None else f"?deviceId={device_id}"
        return client.put(f"/v1/accounts/name{query}", json={"deviceName": b64(name)}, headers=auth).status_code

    def names() -> dict[int, str | None]:
        return {d["id"]: d["name"] for d in client.get("/v1/devices", headers=alice.auth).json()["devices"]}

    assert rename(alice.auth, b"x" * 225, 2) == 204
    assert rename(second.auth, b"mine") == 204
    assert rename(third.auth, b"own id", 3) == 204
    assert names() == {1: None, 2: b64(b"mine"), 3: b64(b"own id")}
    assert rename(second.auth, b"theirs", 3) == 403
    assert rename(second.auth, b"theirs", 1) == 403
    assert rename(alice.auth, b"nobody", 9) == 404
    assert rename(alice.auth, b"x" * 226, 2) == 422
    assert rename(alice.auth, b"primary") == 204
    assert names() == {1: b64(b"primary"), 2: b64(b"mine"), 3: b64(b"own id")}


# -- fan-out --------------------------------------------------------------------------------------------


def envelope_of(device: Device) -> Envelope:
    (received,) = device.envelopes(1)
    return received


def settle(client: TestClient, aci: str, *device_ids: int) -> None:
    """Wait until the acknowledgements have emptied the queues, before a socket closes under them."""
    for device_id in device_ids:
        assert wait_until(lambda d=device_id: pending(client, aci, d), 0) == 0


def test_sends_must_name_every_device_and_reach_both(client: TestClient, alice: TestAccount) -> None:
    linked = link_device(client, alice, registration_id=2600)
    carol = register(client, CAROL)
    only_primary = send(client, carol, alice, message(b"x", 1, 1234))
    assert only_primary.status_code == 409, only_primary.text
    assert only_primary.json() == {"missingDevices": [2], "extraDevices": []}
    stale = send(client, carol, alice, message(b"x", 1, 1234), message(b"x", 2, 2601))
    assert stale.status_code == 410, stale.text
    assert stale.json() == {"staleDevices": [2]}
    extra = send(client, carol, alice, message(b"x", 1, 1234), message(b"x", 2, 2600), message(b"x", 3, 7))
    assert extra.status_code == 409 and extra.json() == {"missingDevices": [], "extraDevices": [3]}
    assert pending(client, alice.aci, 1) == 0 and pending(client, alice.aci, 2) == 0

    with client.websocket_connect("/v1/websocket/", headers=alice.auth) as ws1, \
            client.websocket_connect("/v1/websocket/", headers=linked.auth) as ws2:
        primary, second = Device(ws1), Device(ws2)
        primary.expect_queue_empty()
        second.expect_queue_empty()
        ok = send(client, carol, alice, message(b"to one", 1, 1234), message(b"to two", 2, 2600))
        assert ok.status_code == 200 and ok.json() == {"needsSync": False}
        for device, content in ((primary, b"to one"), (second, b"to two")):
            received = envelope_of(device)
            assert received.content == content
            assert received.source_service_id_string == carol.aci and received.source_device == 1
            assert received.destination_service_id_string == alice.aci
        # Addressed by PNI, the linked device's PNI registration id counts.
        by_pni = f"PNI:{alice.pni}"
        stale = send(client, carol, by_pni, message(b"p", 1, 4321), message(b"p", 2, 2600))
        assert stale.status_code == 410 and stale.json() == {"staleDevices": [2]}
        ok = send(client, carol, by_pni, message(b"p1", 1, 4321), message(b"p2", 2, 3600))
        assert ok.status_code == 200, ok.text
        assert envelope_of(primary).content == b"p1"
        assert envelope_of(second).content == b"p2"
        settle(client, alice.aci, 1, 2)


def test_needs_sync_when_the_sender_has_another_device(client: TestClient, alice: TestAccount) -> None:
    carol = register(client, CAROL)
    assert send(client, alice, carol, message(b"a")).json() == {"needsSync": False}
    linked = link_device(client, alice)
    assert send(client, alice, carol, message(b"b")).json() == {"needsSync": True}
    from_linked = send(client, None, carol, message(b"c"), headers=linked.auth)
    assert from_linked.status_code == 200 and from_linked.json() == {"needsSync": True}
    both = (message(b"d", 1, 1234), message(b"d", 2, linked.registration_id))
    assert send(client, carol, alice, *both).json() == {"needsSync": False}, "Carol has one device"
    assert client.delete("/v1/devices/2", headers=alice.auth).status_code == 204
    assert send(client, alice, carol, message(b"e")).json() == {"needsSync": False}


def test_sync_messages_reach_the_senders_other_devices_only(client: TestClient, alice: TestAccount) -> None:
    linked = link_device(client, alice, registration_id=2700)
    naming_self = send(client, alice, alice, message(b"s", 1, 1234), message(b"s", 2, 2700))
    assert naming_self.status_code == 409, naming_self.text
    assert naming_self.json() == {"missingDevices": [], "extraDevices": [1]}
    missing = send(client, alice, alice, message(b"s", 1, 1234))
    assert missing.status_code == 409 and missing.json() == {"missingDevices": [2], "extraDevices": [1]}
    assert send(client, alice, f"PNI:{alice.pni}", message(b"s", 2, 3700)).status_code == 403

    with client.websocket_connect("/v1/websocket/", headers=linked.auth) as ws:
        second = Device(ws)
        second.expect_queue_empty()
        sync = send(client, alice, alice, message(b"sync", 2, 2700))
        assert sync.status_code == 200 and sync.json() == {"needsSync": False}
        received = envelope_of(second)
        assert received.content == b"sync"
        assert received.source_service_id_string == alice.aci and received.source_device == 1
        assert received.destination_service_id_string == alice.aci
        settle(client, alice.aci, 2)
    assert pending(client, alice.aci, 1) == 0, "the sending device gets no copy"
    # And the other way round: the linked device's sync message is for the primary alone.
    back = send(client, None, alice, message(b"back", 1, 1234), headers=linked.auth)
    assert back.status_code == 200, back.text
    assert pending(client, alice.aci, 1) == 1 and pending(client, alice.aci, 2) == 0
    with client.websocket_connect("/v1/websocket/", headers=alice.auth) as ws:
        received = envelope_of(Device(ws))
        assert received.content == b"back" and received.source_device == 2
        settle(client, alice.aci, 1)


def test_linked_device_receives_only_messages_sent_after_it_was_linked(
    client: TestClient, alice: TestAccount
) -> None:
    carol = register(client, CAROL)
    assert send(client, carol, alice, message(b"before", 1, 1234)).status_code == 200
    first = link_device(client, alice, registration_id=2801)
    assert pending(client, alice.aci, 2) == 0
    assert send(client, carol, alice, message(b"while", 1, 1234), message(b"while", 2, 2801)).status_code == 200
    # Device 2 goes, a new device takes its id: it must not inherit the old device's queue.
    assert client.delete("/v1/devices/2", headers=alice.auth).status_code == 204
    second = link_device(client, alice, registration_id=2802)
    assert second.device_id == 2 and first.password != second.password
    assert pending(client, alice.aci, 2) == 0
    with client.websocket_connect("/v1/websocket/", headers=second.auth) as ws:
        device = Device(ws)
        device.expect_queue_empty()  # nothing queued before the link
        after = send(client, carol, alice, message(b"after", 1, 1234), message(b"after", 2, 2802))
        assert after.status_code == 200
        assert envelope_of(device).content == b"after"
        settle(client, alice.aci, 2)
    assert pending(client, alice.aci, 1) == 3, "the primary keeps everything it was sent"


def test_send_naming_a_removed_device_is_409(client: TestClient, alice: TestAccount) -> None:
    linked = link_device(client, alice)
    carol = register(client, CAROL)
    both = (message(b"x", 1, 1234), message(b"x", 2, linked.registration_id))
    assert send(client, carol, alice, *both).status_code == 200
    assert client.delete("/v1/devices/2", headers=alice.auth).status_code == 204
    gone = send(client, carol, alice, *both)
    assert gone.status_code == 409, gone.text
    assert gone.json() == {"missingDevices": [], "extraDevices": [2]}
    assert send(client, carol, alice, message(b"x", 1, 1234)).status_code == 200
