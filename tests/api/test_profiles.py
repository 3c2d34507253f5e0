"""Profiles (digest §8): field rules, versioned storage, read access (§7.3), avatars on both blob backends.

Runs on SQLite and PostgreSQL; the avatar tests also on the local and the S3 (moto) blob backend.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.api.foundation_support import assert_error_body, call, custom_client, services
from tests.backends.blob_support import S3_CREDENTIALS, moto_endpoint  # noqa: F401
from tests.helpers import TestAccount, b64, register

SIZES = {"name": 81, "about": 156, "aboutEmoji": 60, "paymentAddress": 582, "phoneNumberSharing": 29}
FIELDS = ("name", "about", "aboutEmoji", "paymentAddress", "phoneNumberSharing")


def version() -> str:
    return secrets.token_hex(32)


def profile_body(ver: str | None = None, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"version": ver or version(), "commitment": b64(os.urandom(97)),
                            "avatar": False, "sameAvatar": False, "badgeIds": []}
    body.update({name: b64(os.urandom(size)) for name, size in SIZES.items()})
    body.update(overrides)
    return body


def put(client: TestClient, account: TestAccount, body: dict[str, Any]) -> Any:
    return client.put("/v1/profile", json=body, headers=account.auth)


def uak_header(account: TestAccount) -> dict[str, str]:
    return {"Unidentified-Access-Key": b64(account.uak)}


def post_form(client: Any, url: str, answer: dict[str, Any], data: bytes, **changes: str) -> Any:
    fields = {"key": answer["key"], "acl": answer["acl"], "x-amz-credential": answer["credential"],
              "x-amz-algorithm": answer["algorithm"], "x-amz-date": answer["date"], "policy": answer["policy"],
              "x-amz-signature": answer["signature"], "Content-Type": "application/octet-stream"}
    fields.update(changes)
    return client.post(url, data=fields, files={"file": ("avatar", data, "application/octet-stream")})


@pytest.fixture
def owner(client: TestClient) -> TestAccount:
    return register(client, "+15555550081")


@pytest.fixture
def reader(client: TestClient) -> TestAccount:
    return register(client, "+15555550082")


def test_put_and_read_back(client: TestClient, owner: TestAccount, reader: TestAccount) -> None:
    body = profile_body()
    response = put(client, owner, body)
    assert response.status_code == 200 and response.content == b""
    for headers in (owner.auth, reader.auth, uak_header(owner)):
        got = client.get(f"/v1/profile/{owner.aci}/{body['version']}", headers=headers)
        assert got.status_code == 200, got.text
        data = got.json()
        for name in FIELDS:
            assert data[name] == body[name], name
        assert data["avatar"] is None
        assert data["uuid"] == owner.aci
        assert data["identityKey"] == b64(owner.aci_identity.public)
        assert data["unidentifiedAccess"] == b64(hmac.new(owner.uak, bytes(32), hashlib.sha256).digest())
        assert data["unrestrictedUnidentifiedAccess"] is False
        assert data["capabilities"]["spqr"] is True and data["capabilities"]["storage"] is True
        assert "transfer" not in data["capabilities"]
        assert data["badges"] == []


def test_updates_are_visible_to_the_next_read(client: TestClient, owner: TestAccount, reader: TestAccount) -> None:
    ver = version()
    for _ in range(3):
        body = profile_body(ver)
        assert put(client, owner, body).status_code == 200
        assert client.get(f"/v1/profile/{owner.aci}/{ver}", headers=reader.auth).json()["name"] == body["name"]


def test_base_profile_and_unknown_version(client: TestClient, owner: TestAccount, reader: TestAccount) -> None:
    base = client.get(f"/v1/profile/{owner.aci}", headers=reader.auth).json()
    assert base["identityKey"] == b64(owner.aci_identity.public) and "name" not in base
    unknown = client.get(f"/v1/profile/{owner.aci}/{version()}", headers=reader.auth)
    assert unknown.status_code == 200
    assert all(unknown.json()[name] is None for name in (*FIELDS, "avatar"))


def test_pni_profiles(client: TestClient, owner: TestAccount, reader: TestAccount) -> None:
    got = client.get(f"/v1/profile/PNI:{owner.pni}", headers=reader.auth)
    assert got.status_code == 200, got.text
    data = got.json()
    assert data["uuid"] == f"PNI:{owner.pni}" and data["identityKey"] == b64(owner.pni_identity.public)
    assert data["unidentifiedAccess"] is None
    assert_error_body(client.get(f"/v1/profile/PNI:{owner.pni}", headers=uak_header(owner)), 401)
    assert_error_body(client.get(f"/v1/profile/PNI:{owner.pni}/{version()}", headers=reader.auth), 400)


def test_read_access_rules(client: TestClient, owner: TestAccount, reader: TestAccount) -> None:
    ver = version()
    assert put(client, owner, profile_body(ver)).status_code == 200
    stranger = str(uuid.uuid4())
    for path in (f"/v1/profile/{owner.aci}/{ver}", f"/v1/profile/{owner.aci}"):
        assert_error_body(client.get(path), 401)
        assert_error_body(client.get(path, headers={"Unidentified-Access-Key": b64(os.urandom(16))}), 401)
        assert_error_body(client.get(path, headers={"Unidentified-Access-Key": b64(os.urandom(15))}), 401)
        assert_error_body(client.get(path, headers={"Unidentified-Access-Key": "%%%"}), 401)
        assert_error_body(client.get(path, headers={"Group-Send-Token": b64(b"x")}), 401)
    # unknown accounts: 401 for anonymous callers (nothing learned), 404 for authenticated ones
    assert_error_body(client.get(f"/v1/profile/{stranger}/{ver}", headers=uak_header(owner)), 401)
    assert_error_body(client.get(f"/v1/profile/{stranger}", headers=uak_header(owner)), 401)
    assert_error_body(client.get(f"/v1/profile/{stranger}/{ver}", headers=reader.auth), 404)
    assert_error_body(client.get(f"/v1/profile/{stranger}", headers=reader.auth), 404)
    assert_error_body(client.get("/v1/profile/not-a-uuid", headers=reader.auth), 400)
    assert_error_body(client.get(f"/v1/profile/not-a-uuid/{ver}", headers=reader.auth), 400)


def test_unrestricted_access_accepts_any_key(client: TestClient) -> None:
    account = register(client, "+15555550083", accountAttributes={"unrestrictedUnidentifiedAccess": True})
    got = client.get(f"/v1/profile/{account.aci}", headers={"Unidentified-Access-Key": b64(os.urandom(16))})
    assert got.status_code == 200 and got.json()["unrestrictedUnidentifiedAccess"] is True


@pytest.mark.parametrize(
    ("field", "value"),
    [("version", "ab" * 31), ("version", "zz" * 32), ("version", "ab" * 33), ("name", b64(os.urandom(80))),
     ("name", None), ("about", b64(os.urandom(100))), ("aboutEmoji", b64(os.urandom(59))),
     ("paymentAddress", b64(os.urandom(581))), ("phoneNumberSharing", b64(os.urandom(30))),
     ("commitment", None), ("commitment", ""), ("badgeIds", "x"), ("badgeIds", ["x" * 65]), ("name", "%%")],
)
def test_field_rules(client: TestClient, owner: TestAccount, field: str, value: Any) -> None:
    body = profile_body()
    if value is None:
        del body[field]
    else:
        body[field] = value
    assert_error_body(put(client, owner, body), 422)


def test_accepted_sizes(client: TestClient, owner: TestAccount) -> None:
    for name, about, emoji in ((285, 540, 0), (81, 282, 60), (81, 0, 0)):
        body = profile_body(name=b64(os.urandom(name)), about=b64(os.urandom(about)),
                            aboutEmoji=b64(os.urandom(emoji)), paymentAddress="", phoneNumberSharing=None,
                            badgeIds=["TEST"])
        assert put(client, owner, body).status_code == 200, (name, about, emoji)
    assert_error_body(client.put("/v1/profile", json=profile_body()), 401)


def test_payment_address_only_for_the_current_version(client: TestClient, owner: TestAccount,
                                                      reader: TestAccount) -> None:
    old, new = profile_body(), profile_body()
    assert put(client, owner, old).status_code == 200
    assert put(client, owner, new).status_code == 200
    old_read = client.get(f"/v1/profile/{owner.aci}/{old['version']}", headers=reader.auth).json()
    assert old_read["paymentAddress"] is None and old_read["name"] == old["name"]
    new_read = client.get(f"/v1/profile/{owner.aci}/{new['version']}", headers=reader.auth).json()
    assert new_read["paymentAddress"] == new["paymentAddress"]


def test_profiles_v2_capability_is_not_refused(client: TestClient) -> None:
    account = register(client, "+15555550084",
                       accountAttributes={"capabilities": {"spqr": True, "profiles_v2": True}})
    assert put(client, account, profile_body()).status_code == 200


def test_profile_rate_limit(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with custom_client(backend, tmp_path, request,
                       rate_limits={"profile": {"capacity": 2, "permit_seconds": 3600}}) as client:
        owner, reader = register(client, "+15555550085"), register(client, "+15555550086")
        for _ in range(2):
            assert client.get(f"/v1/profile/{owner.aci}", headers=reader.auth).status_code == 200
        limited = client.get(f"/v1/profile/{owner.aci}", headers=reader.auth)
        assert_error_body(limited, 429)
        assert "Retry-After" in limited.headers
        for _ in range(3):  # anonymous reads are not counted
            assert client.get(f"/v1/profile/{owner.aci}", headers=uak_header(owner)).status_code == 200


def test_deleting_the_account_deletes_its_profiles(client: TestClient, owner: TestAccount) -> None:
    assert put(client, owner, profile_body()).status_code == 200
    counts = call(client, services(client).accounts.store.count_rows_for, uuid.UUID(owner.aci))
    assert counts["profile_versions"] == 1 and counts["profile_current"] == 1
    assert client.delete("/v1/accounts/me", headers=owner.auth).status_code == 204
    counts = call(client, services(client).accounts.store.count_rows_for, uuid.UUID(owner.aci))
    assert counts["profile_versions"] == 0 and counts["profile_current"] == 0


# -- avatars ---------------------------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def media(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[tuple[TestClient, str | None]]:
    settings: dict[str, Any] = {}
    bucket_url = None
    if request.param == "s3":
        endpoint = request.getfixturevalue("moto_endpoint")
        bucket = f"av-{os.getpid()}-{time.monotonic_ns()}"
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=bucket)
        settings = {"backend": "s3", "s3_endpoint": endpoint, "s3_bucket": bucket, **S3_CREDENTIALS}
        bucket_url = f"{endpoint}/{bucket}"
    with custom_client(backend, tmp_path, request, media=settings) as test_client:
        yield test_client, bucket_url


def test_avatar_update_upload_replace_clear(media: tuple[TestClient, str | None]) -> None:
    client, _ = media
    owner, reader = register(client, "+15555550087"), register(client, "+15555550088")
    ver = version()
    answer = put(client, owner, profile_body(ver, avatar=True)).json()
    assert set(answer) == {"key", "credential", "acl", "algorithm", "date", "policy", "signature"}
    assert answer["key"].startswith("profiles/") and answer["acl"] == "private"
    assert answer["algorithm"] == "AWS4-HMAC-SHA256" and answer["credential"].endswith("/s3/aws4_request")
    import json

    policy = json.loads(base64.b64decode(answer["policy"]))
    assert ["content-length-range", 1, 10 * 1024 * 1024] in policy["conditions"]
    assert {"key": answer["key"]} in policy["conditions"]
    image = os.urandom(50_000)
    assert post_form(client, "/", answer, image).status_code == 204
    read = client.get(f"/v1/profile/{owner.aci}/{ver}", headers=reader.auth).json()
    assert read["avatar"] == answer["key"]
    assert client.get(f"/{answer['key']}").content == image
    ranged = client.get(f"/{answer['key']}", headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.content == image[:10]
    # UNCHANGED keeps it
    assert put(client, owner, profile_body(ver, avatar=True, sameAvatar=True)).content == b""
    assert client.get(f"/v1/profile/{owner.aci}/{ver}", headers=reader.auth).json()["avatar"] == answer["key"]
    # a new UPDATE deletes the old object
    second = put(client, owner, profile_body(ver, avatar=True)).json()
    assert second["key"] != answer["key"]
    assert client.get(f"/{answer['key']}").status_code == 404
    assert post_form(client, "/", second, b"new").status_code == 204
    # CLEAR deletes it too
    assert put(client, owner, profile_body(ver, avatar=False)).status_code == 200
    assert client.get(f"/{second['key']}").status_code == 404
    assert client.get(f"/v1/profile/{owner.aci}/{ver}", headers=reader.auth).json()["avatar"] is None


@pytest.mark.parametrize("media", ["s3"], indirect=True)  # only the S3 backend has a bucket of its own
def test_avatar_post_straight_to_the_s3_bucket(media: tuple[TestClient, str | None]) -> None:
    client, bucket_url = media
    assert bucket_url is not None
    owner = register(client, "+15555550089")
    answer = put(client, owner, profile_body(avatar=True)).json()
    image = os.urandom(1000)
    with httpx.Client() as http:
        response = post_form(http, bucket_url, answer, image)
    assert response.status_code in (200, 201, 204), response.text
    assert client.get(f"/{answer['key']}").content == image


def test_avatar_post_checks_policy_and_signature(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with custom_client(backend, tmp_path, request, media={"avatar_max_bytes": 1000}) as client:
        owner = register(client, "+15555550091")
        answer = put(client, owner, profile_body(avatar=True)).json()
        bad_signature = "0" * 64
        assert_error_body(post_form(client, "/", answer, b"x", **{"x-amz-signature": bad_signature}), 403)
        assert_error_body(post_form(client, "/", answer, b"x", key="profiles/other"), 403)
        assert_error_body(post_form(client, "/", answer, b"x", acl="public-read"), 403)
        assert_error_body(post_form(client, "/", answer, b"x", **{"x-amz-date": "20200101T000000Z"}), 403)
        assert_error_body(post_form(client, "/", answer, b""), 400)  # below 1 byte
        assert_error_body(post_form(client, "/", answer, os.urandom(1001)), 400)  # above the policy's range
        assert_error_body(post_form(client, "/", answer, os.urandom(200_000)), 413)  # refused by length
        # an expired policy, properly signed
        profiles = services(client).profiles
        assert profiles is not None
        old = profiles.signer.form(answer["key"], 1000, 60, now=datetime.now(UTC) - timedelta(hours=1))
        assert_error_body(post_form(client, "/", old, b"x"), 403)
        assert_error_body(client.post("/", content=b"x", headers={"Content-Type": "text/plain"}), 400)
        assert client.get(f"/{answer['key']}").status_code == 404
        assert post_form(client, "/", answer, b"ok").status_code == 204
        assert client.get(f"/{answer['key']}").content == b"ok"


def test_orphan_avatars_are_purged(client: TestClient, owner: TestAccount) -> None:
    profiles = services(client).profiles
    assert profiles is not None and "orphan_avatars" in services(client).retention.purges
    kept = put(client, owner, profile_body(avatar=True)).json()
    assert post_form(client, "/", kept, b"kept").status_code == 204
    other = profiles.signer.form("profiles/orphan", 1000, 60)
    assert post_form(client, "/", other, b"orphan").status_code == 204
    now = int(time.time())
    assert call(client, profiles.purge_orphan_avatars, now) == 0  # younger than a day
    assert call(client, profiles.purge_orphan_avatars, now + 2 * 86400) == 1
    assert client.get("/profiles/orphan").status_code == 404
    assert client.get(f"/{kept['key']}").content == b"kept"
