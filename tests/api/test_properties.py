"""Property-based tests: malformed bodies always get a 4xx with a JSON error body, never a 5xx.

They run on SQLite only, with a modest number of examples, on one app per test.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailslot.app import create_app
from tests.api.foundation_support import Registration
from tests.conftest import make_settings
from tests.helpers import register, verified_session

NUMBER = "+15555550060"
EXAMPLES = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
UNLIMITED = {name: {"capacity": 1_000_000, "permit_seconds": 0.001} for name in (
    "verificationSessionPerIp", "verificationSessionPerNumber", "registration", "pin", "checkTotp",
)}


@pytest.fixture
def app_client(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    settings_ = make_settings("sqlite", tmp_path, request, rate_limits=UNLIMITED)
    with TestClient(create_app(settings_)) as client:
        yield client


# -- strategies ----------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=12), children, max_size=4)),
    max_leaves=12,
)
# Strings that are never valid base64: they hold a character outside the alphabet.
not_base64 = st.builds(lambda a, b: a + "*" + b, st.text(max_size=10), st.text(max_size=10))
# Valid base64 of a length no key, signature or access key has.
wrong_length_base64 = st.integers(min_value=0, max_value=40).filter(lambda n: n not in (16, 32, 33, 64)).map(
    lambda n: base64.b64encode(secrets.token_bytes(n)).decode()
)
# Neither a string nor bytes in any accepted form (byte fields also take an array of byte values).
not_a_string = st.one_of(st.integers(), st.booleans(), st.lists(st.text(max_size=3), min_size=1, max_size=3),
                         st.dictionaries(st.text(max_size=5), json_scalars, max_size=3))
not_an_int = st.one_of(st.text(max_size=10).filter(lambda s: not s.strip().lstrip("+-").isdigit()),
                       st.lists(json_scalars, max_size=2),
                       st.dictionaries(st.text(max_size=5), json_scalars, max_size=2),
                       st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f)))
not_a_bool = st.one_of(st.text(min_size=6, max_size=10), st.lists(json_scalars, min_size=1, max_size=2),
                       st.integers(min_value=2), st.dictionaries(st.text(max_size=5), json_scalars, min_size=1))
bad_bytes = st.one_of(not_base64, wrong_length_base64, not_a_string)
raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
)


def assert_client_error(response: Any) -> None:
    """A 4xx whose body is JSON: {code, message} or one of the digest's own bodies."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert isinstance(body, dict), body
    digest_bodies = (
        {"originalNumber", "normalizedNumber"},  # 400 number not normalised
        {"timeRemaining", "svr2Credentials"},  # 423 registration lock
        {"reason", "permanentFailure"},  # 440 provider failure
    )
    if "code" in body or "message" in body:
        assert isinstance(body.get("code"), str) and body["code"], body
        assert isinstance(body.get("message"), str) and body["message"], body
    elif "verified" in body:  # verification errors answer with the session
        assert {"id", "nextSms", "nextCall", "verified"} <= set(body), body
    else:
        assert set(body) in digest_bodies, body


def post_raw(client: TestClient, method: str, url: str, content: bytes, **headers: str) -> Any:
    return client.request(method, url, content=content, headers={"content-type": "application/json", **headers})


# -- verification sessions -----------------------------------------------------------------------


@EXAMPLES
@given(body=raw_bodies)
def test_create_session_raw_bodies(app_client: TestClient, body: bytes) -> None:
    response = post_raw(app_client, "POST", "/v1/verification/session", body)
    assert_client_error(response)


@EXAMPLES
@given(
    number=st.one_of(not_a_string, st.text(max_size=20)),
    push_token=st.one_of(st.none(), st.text(max_size=20), not_a_string),
    push_token_type=st.one_of(st.none(), st.text(max_size=8), not_a_string),
    extra=st.dictionaries(st.sampled_from(["captcha", "mcc", "mnc", "pushChallenge"]), json_values, max_size=2),
)
def test_create_session_wrong_types(
    app_client: TestClient, number: Any, push_token: Any, push_token_type: Any, extra: dict[str, Any]
) -> None:
    body = {"number": number, "pushToken": push_token, "pushTokenType": push_token_type, **extra}
    response = app_client.post("/v1/verification/session", json=body)
    if response.status_code == 200:  # only a real, normalised number with a consistent push pair passes
        import phonenumbers

        assert isinstance(number, str) and phonenumbers.is_valid_number(phonenumbers.parse(number))
        assert (push_token is None) == (push_token_type is None)
    else:
        assert_client_error(response)


@pytest.fixture
def session_id(app_client: TestClient) -> str:
    response = app_client.post("/v1/verification/session", json={"number": NUMBER})
    session = str(response.json()["id"])
    app_client.post(f"/v1/verification/session/{session}/code", json={"transport": "sms"})
    return session


@EXAMPLES
@given(body=raw_bodies)
def test_submit_code_raw_bodies(app_client: TestClient, session_id: str, body: bytes) -> None:
    response = post_raw(app_client, "PUT", f"/v1/verification/session/{session_id}/code", body)
    if response.status_code != 200:
        assert_client_error(response)
    else:
        assert json.loads(body)["code"].isdigit()


@EXAMPLES
@given(code=st.one_of(not_a_string, st.text(max_size=20)), session=st.text(min_size=1, max_size=60))
def test_submit_code_wrong_types_and_ids(app_client: TestClient, session_id: str, code: Any, session: str) -> None:
    response = app_client.put(f"/v1/verification/session/{session_id}/code", json={"code": code})
    if response.status_code == 200:
        assert isinstance(code, str) and code.isascii() and code.isdigit() and len(code) <= 16
    else:
        assert_client_error(response)
    response = app_client.put(f"/v1/verification/session/{quote(session, safe='')}/code", json={"code": "123456"})
    assert_client_error(response)


# -- registration --------------------------------------------------------------------------------

REGISTRATION_FIELDS: dict[str, Any] = {
    "sessionId": st.one_of(not_a_string, st.text(max_size=30)),
    "recoveryPassword": bad_bytes,
    "totp": not_an_int,
    "skipDeviceTransfer": not_a_bool,
    "aciIdentityKey": bad_bytes,
    "pniIdentityKey": bad_bytes,
    "aciSignedPreKey": st.one_of(not_a_string, json_scalars),
    "aciSignedPreKey.publicKey": bad_bytes,
    "aciSignedPreKey.signature": bad_bytes,
    "aciSignedPreKey.keyId": st.one_of(not_an_int, st.integers(max_value=-1), st.integers(min_value=2**31)),
    "pniSignedPreKey.signature": bad_bytes,
    "aciPqLastResortPreKey.publicKey": bad_bytes,
    "pniPqLastResortPreKey": st.one_of(not_a_string, st.text(max_size=5)),
    "accountAttributes": st.one_of(not_a_string, json_scalars),
    "accountAttributes.registrationId": st.one_of(not_an_int, st.integers(max_value=0), st.integers(min_value=16384)),
    "accountAttributes.pniRegistrationId": st.one_of(not_an_int, st.integers(max_value=0)),
    "accountAttributes.unidentifiedAccessKey": st.one_of(not_base64, wrong_length_base64),
    "accountAttributes.capabilities": st.one_of(st.lists(st.text(max_size=5), max_size=2), st.text(max_size=5),
                                                st.integers()),
    "accountAttributes.registrationLock": st.text(max_size=70).filter(lambda s: len(s) not in (0, 64)),
    "accountAttributes.name": not_base64,
    "accountAttributes.fetchesMessages": not_a_bool,
    "apnToken": st.one_of(not_a_string, st.text(max_size=5)),
    "gcmToken": st.dictionaries(st.text(max_size=5), json_scalars, max_size=2),
}


def mutate(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(body))
    *parents, leaf = path.split(".")
    target = copy
    for part in parents:
        target = target[part]
    target[leaf] = value
    return copy


@pytest.fixture
def registration(app_client: TestClient) -> tuple[Registration, dict[str, Any]]:
    register(app_client, NUMBER)  # re-registrations are what the mutated bodies would do
    reg = Registration(NUMBER)
    return reg, reg.body(verified_session(app_client, NUMBER))


@EXAMPLES
@given(data=st.data(), fields=st.lists(st.sampled_from(sorted(REGISTRATION_FIELDS)), min_size=1, max_size=3,
                                       unique=True))
def test_registration_mutated_bodies(
    app_client: TestClient, registration: tuple[Registration, dict[str, Any]], data: st.DataObject, fields: list[str]
) -> None:
    reg, body = registration
    for path in fields:
        try:
            body = mutate(body, path, data.draw(REGISTRATION_FIELDS[path], label=path))
        except (TypeError, KeyError):  # an earlier mutation replaced the parent object
            continue
    response = app_client.post("/v1/registration", json=body, headers=reg.headers)
    assert_client_error(response)


@EXAMPLES
@given(body=raw_bodies)
def test_registration_raw_bodies(app_client: TestClient, body: bytes) -> None:
    reg = Registration(NUMBER)
    assert_client_error(post_raw(app_client, "POST", "/v1/registration", body, **reg.headers))


@EXAMPLES
@given(user=st.text(max_size=30), password=st.text(max_size=30), raw=st.binary(max_size=40))
def test_registration_odd_credentials(app_client: TestClient, user: str, password: str, raw: bytes) -> None:
    reg = Registration(NUMBER)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    for header in (f"Basic {token}", "Basic " + base64.b64encode(raw).decode(), raw.decode("latin-1")):
        try:
            response = app_client.post("/v1/registration", json=reg.body(None), headers={"Authorization": header})
        except Exception as exc:  # httpx refuses some header values client-side; nothing reached the server
            assert "header" in str(exc).lower() or isinstance(exc, UnicodeError), exc
            continue
        assert_client_error(response)


# -- account attributes --------------------------------------------------------------------------

ATTRIBUTE_FIELDS: dict[str, Any] = {
    key.removeprefix("accountAttributes."): strategy
    for key, strategy in REGISTRATION_FIELDS.items()
    if key.startswith("accountAttributes.")
}
ATTRIBUTE_FIELDS["recoveryPassword"] = bad_bytes.filter(lambda v: v != "")
ATTRIBUTE_FIELDS["unrestrictedUnidentifiedAccess"] = not_a_bool


@pytest.fixture
def account_auth(app_client: TestClient) -> dict[str, str]:
    return register(app_client, "+15555550061").auth


@EXAMPLES
@given(data=st.data(), fields=st.lists(st.sampled_from(sorted(ATTRIBUTE_FIELDS)), min_size=1, max_size=3, unique=True))
def test_attributes_mutated_bodies(
    app_client: TestClient, account_auth: dict[str, str], data: st.DataObject, fields: list[str]
) -> None:
    body: dict[str, Any] = {
        "fetchesMessages": True, "registrationId": 1234, "pniRegistrationId": 4321,
        "capabilities": {"spqr": True}, "unidentifiedAccessKey": base64.b64encode(b"k" * 16).decode(),
    }
    for name in fields:
        body[name] = data.draw(ATTRIBUTE_FIELDS[name], label=name)
    response = app_client.put("/v1/accounts/attributes/", json=body, headers=account_auth)
    assert_client_error(response)


@EXAMPLES
@given(body=raw_bodies)
def test_attributes_raw_bodies(app_client: TestClient, account_auth: dict[str, str], body: bytes) -> None:
    response = post_raw(app_client, "PUT", "/v1/accounts/attributes/", body, **account_auth)
    assert_client_error(response)
