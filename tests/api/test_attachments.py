"""Attachments (digest §9): the upload form, the built-in tus 1.0 endpoint, downloads with Range, expiry.

Runs on SQLite and PostgreSQL; the upload/resume/download tests also on both blob backends (local
directory and an S3-compatible server, moto).
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.foundation_support import assert_error_body, call, custom_client, services
from tests.backends.blob_support import S3_CREDENTIALS, moto_endpoint  # noqa: F401
from tests.helpers import TestAccount, register

MiB = 1024 * 1024
TUS = {"Tus-Resumable": "1.0.0"}


def form(client: TestClient, account: TestAccount, length: int | None = 1000) -> dict[str, Any]:
    query = "" if length is None else f"?uploadLength={length}"
    response = client.get(f"/v4/attachments/form/upload{query}", headers=account.auth)
    assert response.status_code == 200, response.text
    return dict(response.json())


def create(client: TestClient, upload: dict[str, Any], length: int) -> Any:
    return client.post("/attachments", headers={**upload["headers"], **TUS, "Upload-Length": str(length)})


def patch(client: TestClient, upload: dict[str, Any], offset: int, data: bytes, **headers: str) -> Any:
    return client.patch(
        f"/attachments/{upload['key']}", content=data,
        headers={"Authorization": upload["headers"]["Authorization"], **TUS, "Upload-Offset": str(offset),
                 "Content-Type": "application/offset+octet-stream", **headers},
    )


def head(client: TestClient, upload: dict[str, Any]) -> Any:
    return client.head(f"/attachments/{upload['key']}",
                       headers={"Authorization": upload["headers"]["Authorization"], **TUS})


@pytest.fixture
def account(client: TestClient) -> TestAccount:
    return register(client, "+15555550071")


@pytest.fixture(params=["local", "s3"])
def media_client(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[TestClient]:
    media: dict[str, Any] = {}
    if request.param == "s3":
        endpoint = request.getfixturevalue("moto_endpoint")
        bucket = f"att-{os.getpid()}-{time.monotonic_ns()}"
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=bucket)
        media = {"backend": "s3", "s3_endpoint": endpoint, "s3_bucket": bucket, **S3_CREDENTIALS,
                 "s3_part_bytes": 5 * MiB}
    with custom_client(backend, tmp_path, request, media=media) as test_client:
        yield test_client


def test_form_answers_cdn3_with_a_signed_tus_location(client: TestClient, account: TestAccount) -> None:
    upload = form(client, account, 1234)
    assert upload["cdn"] == 3
    assert len(upload["key"]) == 20 and "=" not in upload["key"]
    assert upload["signedUploadLocation"].endswith("/attachments")
    assert upload["headers"]["Authorization"].startswith("Bearer ")
    assert upload["headers"]["Upload-Metadata"] == "filename " + base64.b64encode(upload["key"].encode()).decode()
    assert form(client, account, None)["key"] != upload["key"]  # uploadLength may be left out


def test_form_limits(client: TestClient, account: TestAccount) -> None:
    assert_error_body(client.get("/v4/attachments/form/upload?uploadLength=10"), 401)
    over = client.get(f"/v4/attachments/form/upload?uploadLength={100 * MiB + 1}", headers=account.auth)
    assert_error_body(over, 413)
    assert client.get(f"/v4/attachments/form/upload?uploadLength={100 * MiB}", headers=account.auth).status_code == 200
    assert_error_body(client.get("/v4/attachments/form/upload?uploadLength=0", headers=account.auth), 400)
    assert_error_body(client.get("/v4/attachments/form/upload?uploadLength=x", headers=account.auth), 422)


def test_form_rate_limits(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    limits = {"attachmentCreate": {"capacity": 2, "permit_seconds": 3600},
              "attachmentCreateBytes": {"capacity": 5000, "permit_seconds": 3600}}
    with custom_client(backend, tmp_path, request, rate_limits=limits) as client:
        account = register(client, "+15555550072")
        form(client, account, 3000)
        refused = client.get("/v4/attachments/form/upload?uploadLength=3000", headers=account.auth)
        assert_error_body(refused, 429, "rate_limited")  # bytes: 3000 + 3000 > 5000
        assert int(refused.headers["Retry-After"]) > 0
        refused = client.get("/v4/attachments/form/upload?uploadLength=10", headers=account.auth)
        assert_error_body(refused, 429)  # the third form in the attachmentCreate bucket of 2
        other = register(client, "+15555550073")
        form(client, other, 10)  # per account


def test_tus_options_advertise_the_protocol(client: TestClient) -> None:
    response = client.options("/attachments")
    assert response.status_code == 204
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert response.headers["Tus-Version"] == "1.0.0"
    assert set(response.headers["Tus-Extension"].split(",")) == {"creation", "termination", "expiration"}
    assert int(response.headers["Tus-Max-Size"]) == 100 * MiB


def test_upload_resume_and_ranged_download(media_client: TestClient) -> None:
    client = media_client
    account = register(client, "+15555550074")
    data = os.urandom(12 * MiB + 333)
    upload = form(client, account, len(data))
    created = create(client, upload, len(data))
    assert created.status_code == 201, created.text
    assert created.headers["Location"].endswith(f"/attachments/{upload['key']}")
    assert created.headers["Tus-Resumable"] == "1.0.0" and "Upload-Expires" in created.headers
    first = head(client, upload)
    assert first.status_code == 200 and first.headers["Upload-Offset"] == "0"
    assert first.headers["Upload-Length"] == str(len(data)) and first.headers["Cache-Control"] == "no-store"
    # the first 7 MiB in two pieces, a piece smaller than an S3 part in between, then the rest
    offset = 0
    for size in (4 * MiB, 3 * MiB, 1000):
        response = patch(client, upload, offset, data[offset:offset + size])
        assert response.status_code == 204, response.text
        offset += size
        assert response.headers["Upload-Offset"] == str(offset)
    assert head(client, upload).headers["Upload-Offset"] == str(offset)
    assert client.get(f"/attachments/{upload['key']}").status_code == 404  # not downloadable before the end
    stale = patch(client, upload, 0, b"x")
    assert_error_body(stale, 409)
    assert stale.headers["Upload-Offset"] == str(offset)
    assert patch(client, upload, offset, data[offset:]).status_code == 204
    assert head(client, upload).headers["Upload-Offset"] == str(len(data))

    other = register(client, "+15555550075")  # a download needs no credentials of the uploader
    whole = client.get(f"/attachments/{upload['key']}", headers=other.auth)
    assert whole.status_code == 200 and whole.headers["Accept-Ranges"] == "bytes"
    assert hashlib.sha256(whole.content).digest() == hashlib.sha256(data).digest()
    part = client.get(f"/attachments/{upload['key']}", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    tail = client.get(f"/attachments/{upload['key']}", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    open_ended = client.get(f"/attachments/{upload['key']}", headers={"Range": f"bytes={len(data) - 5}-"})
    assert open_ended.status_code == 206 and open_ended.content == data[-5:]
    beyond = client.get(f"/attachments/{upload['key']}", headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{len(data)}"
    # a finished attachment cannot be uploaded again under its key
    assert_error_body(create(client, upload, 10), 409)


def test_patch_rules(client: TestClient, account: TestAccount) -> None:
    upload = form(client, account, 100)
    assert create(client, upload, 10).status_code == 201
    wrong_type = patch(client, upload, 0, b"abc", **{"Content-Type": "application/octet-stream"})
    assert_error_body(wrong_type, 415)
    assert_error_body(patch(client, upload, 0, b"abc", **{"Upload-Offset": "x"}), 400)
    assert_error_body(patch(client, upload, 0, b"abc", **{"Tus-Resumable": "0.2.2"}), 412)
    assert_error_body(patch(client, upload, 0, b"0123456789abc"), 413)  # beyond Upload-Length
    assert head(client, upload).headers["Upload-Offset"] == "0"
    assert patch(client, upload, 0, b"01234").status_code == 204
    assert patch(client, upload, 5, b"56789").headers["Upload-Offset"] == "10"
    assert client.get(f"/attachments/{upload['key']}").content == b"0123456789"


def test_create_rules(client: TestClient, account: TestAccount) -> None:
    upload = form(client, account, 100)
    assert_error_body(create(client, upload, 101), 413)  # more than the token allows
    assert_error_body(create(client, upload, 0), 400)
    headers = {**upload["headers"], **TUS}
    assert_error_body(client.post("/attachments", headers=headers), 400)  # no Upload-Length
    other = form(client, account, 100)
    mismatched = {**headers, "Upload-Length": "5", "Upload-Metadata": other["headers"]["Upload-Metadata"]}
    assert_error_body(client.post("/attachments", headers=mismatched), 403)


def test_upload_tokens_and_session_tokens_never_mix(client: TestClient, account: TestAccount) -> None:
    upload = form(client, account, 100)
    assert create(client, upload, 10).status_code == 201
    # an upload token is not a session token
    whoami = client.get("/v1/accounts/whoami", headers={"Authorization": upload["headers"]["Authorization"]})
    assert whoami.status_code == 401
    # a session token is not an upload token
    session = client.post("/v1/auth/session", headers=account.auth)
    assert session.status_code == 200, session.text
    bearer = {"Authorization": f"Bearer {session.json()['accessToken']}"}
    assert client.get("/v1/accounts/whoami", headers=bearer).status_code == 200
    assert_error_body(client.post("/attachments", headers={**bearer, **TUS, "Upload-Length": "5"}), 401)
    assert client.head(f"/attachments/{upload['key']}", headers={**bearer, **TUS}).status_code == 401
    sneaky = patch(client, upload, 0, b"abc", Authorization=bearer["Authorization"])
    assert_error_body(sneaky, 401)
    # a token for one key does not open another upload
    other = form(client, account, 100)
    assert create(client, other, 10).status_code == 201
    crossed = patch(client, other, 0, b"abc", Authorization=upload["headers"]["Authorization"])
    assert_error_body(crossed, 401)
    assert_error_body(client.post("/attachments", headers={**TUS, "Upload-Length": "5"}), 401)


def test_termination(client: TestClient, account: TestAccount) -> None:
    upload = form(client, account, 100)
    assert create(client, upload, 10).status_code == 201
    auth = {"Authorization": upload["headers"]["Authorization"], **TUS}
    assert client.delete(f"/attachments/{upload['key']}", headers=auth).status_code == 204
    assert head(client, upload).status_code == 404
    assert_error_body(patch(client, upload, 0, b"abc"), 404)
    assert client.delete(f"/attachments/{upload['key']}", headers=auth).status_code == 404


def test_unfinished_uploads_and_old_attachments_expire(client: TestClient, account: TestAccount) -> None:
    service = services(client).attachments
    assert service is not None
    assert "attachment_uploads" in services(client).retention.purges
    assert "attachments" in services(client).retention.purges
    unfinished = form(client, account, 100)
    assert create(client, unfinished, 10).status_code == 201
    finished = form(client, account, 100)
    assert create(client, finished, 3).status_code == 201
    assert patch(client, finished, 0, b"abc").status_code == 204
    now = int(time.time())
    assert call(client, service.purge_uploads, now) == 0
    assert call(client, service.purge_attachments, now) == 0
    assert call(client, service.purge_uploads, now + 86400 + 60) == 1
    assert head(client, unfinished).status_code == 404
    assert client.get(f"/attachments/{finished['key']}").status_code == 200
    assert call(client, service.purge_attachments, now + 30 * 86400 + 60) == 1
    assert client.get(f"/attachments/{finished['key']}").status_code == 404


def test_downloads_of_unknown_keys(client: TestClient) -> None:
    assert_error_body(client.get("/attachments/AAAAAAAAAAAAAAAAAAAA"), 404)
    assert_error_body(client.get("/attachments/..%2F..%2Fetc"), 404)


def test_large_patch_is_not_held_to_the_request_body_cap(backend: str, tmp_path: Path,
                                                        request: pytest.FixtureRequest) -> None:
    with custom_client(backend, tmp_path, request, server={"max_body_bytes": 16384}) as client:
        account = register(client, "+15555550076")
        upload = form(client, account, 3 * MiB)
        assert create(client, upload, 3 * MiB).status_code == 201
        assert patch(client, upload, 0, os.urandom(3 * MiB)).status_code == 204
        assert client.post("/v1/auth/session", headers=account.auth, content=b"x" * 20000).status_code == 413
