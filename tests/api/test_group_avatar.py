"""The group avatar (GROUPS.md): an upload form authorised by Group-Auth, never by an account; the
blob is kept while its group names it and deleted when the group replaces it."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mailslot.client import groups as g
from tests.api.foundation_support import call, services
from tests.api.group_support import Group
from tests.api.test_attachments import create, patch
from tests.helpers import register


@pytest.fixture
def group_client(client: TestClient) -> Group:
    group = Group(client)
    group.create()
    return group


def avatar_form(group: Group, key: g.MemberKey, headers: dict[str, str] | None = None) -> Any:
    return group.send(key, "GET", "/avatar/form", headers=headers)


def upload(client: TestClient, form: dict[str, Any], data: bytes) -> None:
    assert create(client, form, len(data)).status_code == 201
    assert patch(client, form, 0, data).status_code == 204


def test_a_member_uploads_the_group_avatar_with_group_auth_and_members_download_it(group_client: Group) -> None:
    group = group_client
    response = avatar_form(group, group.member)
    assert response.status_code == 200, response.text
    form = response.json()
    assert form["cdn"] == 3 and form["key"].startswith("g-") and form["signedUploadLocation"].endswith("/attachments")
    image = os.urandom(4000)  # sealed by the client under the state key: opaque here
    upload(group.client, form, image)
    assert group.patch(group.member, g.set_avatar(form["key"])).status_code == 200
    assert group.state()["avatar"] == form["key"]
    assert group.client.get(f"/attachments/{form['key']}").content == image


def test_the_form_refuses_accounts_outsiders_and_members_the_access_control_excludes(group_client: Group) -> None:
    group = group_client
    alice = register(group.client, "+15555550001")
    refused = avatar_form(group, group.member, headers=alice.auth)
    assert refused.status_code == 400 and refused.json()["code"] == "credentials_not_allowed"
    assert avatar_form(group, g.MemberKey.generate()).status_code == 403
    assert group.patch(group.admin, g.set_access("attributes", "ADMIN")).status_code == 200
    assert avatar_form(group, group.member).status_code == 403
    assert avatar_form(group, group.admin).status_code == 200
    # Without Group-Auth there is no form at all.
    assert group.client.get(group.path("/avatar/form")).status_code == 401


def test_a_replaced_avatar_is_deleted_and_only_orphans_expire(group_client: Group) -> None:
    group = group_client
    client = group.client
    first, second, orphan = (avatar_form(group, group.admin).json() for _ in range(3))
    for form in (first, second, orphan):
        upload(client, form, os.urandom(100))
    group.patch(group.admin, g.set_avatar(first["key"]))
    group.patch(group.admin, g.set_avatar(second["key"]))
    assert client.get(f"/attachments/{first['key']}").status_code == 404  # replaced: deleted at once
    purges = services(client).retention.purges
    now = int(time.time())
    # Attachments expire after 30 days; group avatars do not (their group still names them) ...
    call(client, purges["attachments"], now + 40 * 86400)
    assert client.get(f"/attachments/{second['key']}").status_code == 200
    # ... and an avatar no group names goes after the upload expiry.
    assert call(client, purges["group_avatars"], now + 2 * 86400) == 1
    assert client.get(f"/attachments/{orphan['key']}").status_code == 404
    assert client.get(f"/attachments/{second['key']}").status_code == 200
    group.patch(group.admin, g.set_avatar(""))
    assert client.get(f"/attachments/{second['key']}").status_code == 404


def test_an_attachment_whose_key_begins_like_a_group_avatar_still_expires_as_an_attachment() -> None:
    from mailslot.services.attachments import GROUP_AVATAR_PREFIX, is_group_avatar, new_key

    assert is_group_avatar(GROUP_AVATAR_PREFIX + new_key())
    assert not is_group_avatar("g-" + new_key()[2:])  # 20 characters: an attachment's key
