"""The group service (GROUPS.md) on SQLite and PostgreSQL: creation, Group-Auth, every action's
permission rule (allowed and refused), the last-admin rule, revisions and conflicts, joins by link,
logs, limits, and what the server's storage holds."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from mailslot.client import groups as g
from tests.api.foundation_support import call, custom_client
from tests.api.group_support import Group, member_blob
from tests.helpers import register


@pytest.fixture
def group(client: TestClient) -> Group:
    group = Group(client)
    group.create()
    return group


def refused(response: Any, action: str, index: int = 0) -> None:
    assert response.status_code == 403, response.text
    body = response.json()
    assert (body["code"], body["action"], body["index"]) == ("forbidden", action, index)


# -- creation -----------------------------------------------------------------------------------

def test_create_returns_revision_zero_and_a_second_create_is_409(client: TestClient) -> None:
    group = Group(client)
    state = group.create().json()
    assert state["revision"] == 0
    assert [m["role"] for m in state["members"]] == ["ADMIN", "MEMBER"]
    again = group.send(group.admin, "PUT", document=g.new_group_state(
        group.secrets, group.admin, member_blob(group.secrets, group.admin)))
    assert again.status_code == 409 and again.json()["code"] == "conflict"


def test_the_creator_must_be_an_admin_of_the_state_it_submits(client: TestClient) -> None:
    group = Group(client)
    outsider = g.MemberKey.generate()
    document = g.new_group_state(group.secrets, group.admin, member_blob(group.secrets, group.admin))
    assert group.send(outsider, "PUT", document=document).status_code == 403
    document["members"][0]["role"] = "MEMBER"
    assert group.send(group.admin, "PUT", document=document).status_code == 403
    assert group.send(outsider, "GET").status_code == 404  # nothing was created


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(revision=1),
    lambda d: d.update(title=base64.b64encode(b"plaintext title").decode()),
    lambda d: d["members"][0].update(publicKey=base64.b64encode(b"short").decode()),
    lambda d: d["members"][0].update(role="OWNER"),
    lambda d: d["members"].append(dict(d["members"][0])),
    lambda d: d["accessControl"].update(addFromInviteLink="SOMETIMES"),
    lambda d: d.update(avatar="../../etc/passwd"),
    lambda d: d.update(requestingMembers=[{"publicKey": d["members"][0]["publicKey"], "encryptedMember": ""}]),
])
def test_malformed_states_are_400_and_create_nothing(
    client: TestClient, mutate: Callable[[dict[str, Any]], None]
) -> None:
    group = Group(client)
    document = g.new_group_state(group.secrets, group.admin, member_blob(group.secrets, group.admin), title="t")
    mutate(document)
    response = group.send(group.admin, "PUT", document=document)
    assert response.status_code == 400, response.text
    assert response.json()["code"] in ("invalid_group", "bad_request")
    assert group.send(group.admin, "GET").status_code == 404


def test_malformed_json_and_group_ids_are_400(client: TestClient, group: Group) -> None:
    from mailslot.crypto.groupauth import make_header

    path = group.path()
    body = b"{not json"
    now = int(time.time() * 1000)
    headers = {"Group-Auth": make_header(group.admin.private_key, group.gid, "PATCH", path, now, body)}
    response = client.patch(path, content=body, headers=headers)
    assert response.status_code == 400 and response.json()["code"] == "bad_request"
    for bad in ("short", "A" * 43 + "=", "!" * 43):
        response = client.get(f"/v1/groups/{bad}", headers={"Group-Auth": "x"})
        assert response.status_code == 400


# -- Group-Auth -----------------------------------------------------------------------------------

def test_requests_without_or_with_a_malformed_group_auth_are_401(client: TestClient, group: Group) -> None:
    assert client.get(group.path()).status_code == 401
    zero_signature = base64.b64encode(bytes(64)).decode()
    for value in ("", "a.b.c", "AAAA.123.BBBB", f"{group.admin.public_b64}.notms.{zero_signature}"):
        response = client.get(group.path(), headers={"Group-Auth": value})
        assert response.status_code == 401 and response.json()["code"] == "group_auth"


def test_a_signature_over_another_request_is_401(client: TestClient, group: Group) -> None:
    _, headers = g.signed(group.admin, group.gid, "GET", group.path("/logs/0"))
    assert client.get(group.path(), headers=headers).status_code == 401
    _, headers = g.signed(group.admin, group.gid, "PATCH", group.path(), g.change(1, g.set_title(group.secrets, "a")))
    body = json.dumps(g.change(1, g.set_title(group.secrets, "b"))).encode()
    assert client.patch(group.path(), content=body, headers=headers).status_code == 401
    assert group.state()["revision"] == 0


@pytest.mark.parametrize("skew_seconds", [-301, 301])
def test_a_time_more_than_five_minutes_off_is_401(group: Group, skew_seconds: int) -> None:
    response = group.send(group.admin, "GET", timestamp_ms=int((time.time() + skew_seconds) * 1000))
    assert response.status_code == 401
    assert group.send(group.admin, "GET", timestamp_ms=int((time.time() - 240) * 1000)).status_code == 200


def test_a_replayed_request_is_401(client: TestClient, group: Group) -> None:
    document = g.change(1, g.set_title(group.secrets, "x"))
    body, headers = g.signed(group.admin, group.gid, "PATCH", group.path(), document)
    assert client.patch(group.path(), content=body, headers=headers).status_code == 200
    replay = client.patch(group.path(), content=body, headers=headers)
    assert replay.status_code == 401 and "already used" in replay.json()["message"]
    _, get_headers = g.signed(group.admin, group.gid, "GET", group.path())
    assert client.get(group.path(), headers=get_headers).status_code == 200
    assert client.get(group.path(), headers=get_headers).status_code == 401


def test_account_credentials_are_refused_even_with_a_valid_group_auth(client: TestClient, group: Group) -> None:
    alice = register(client, "+15555550001")
    response = group.send(group.admin, "GET", headers=alice.auth)
    assert response.status_code == 400 and response.json()["code"] == "credentials_not_allowed"


def test_group_requests_on_an_authenticated_socket_are_refused(client: TestClient, group: Group) -> None:
    from mailslot.protocol.websocket_pb2 import WebSocketMessage, WebSocketRequestMessage
    from tests.api.delivery_support import receive_frame

    alice = register(client, "+15555550001")

    def tunnel(ws: Any) -> int:
        body, headers = g.signed(group.admin, group.gid, "GET", group.path())
        request = WebSocketMessage(type=WebSocketMessage.REQUEST, request=WebSocketRequestMessage(
            verb="GET", path=group.path(), id=77, headers=[f"{k}:{v}" for k, v in headers.items()]))
        ws.send_bytes(request.SerializeToString())
        while True:
            frame = receive_frame(ws)
            if frame.type == WebSocketMessage.RESPONSE and frame.response.id == 77:
                return int(frame.response.status)

    with client.websocket_connect("/v1/websocket/", headers={**alice.auth, "X-Signal-Disable-Messages": "true"}) as ws:
        assert tunnel(ws) == 400
    with client.websocket_connect("/v1/websocket/") as ws:  # an unauthenticated socket is fine
        assert tunnel(ws) == 200


# -- reading ---------------------------------------------------------------------------------------

def test_only_members_and_invitees_read_the_state(group: Group) -> None:
    invitee = group.invite()
    assert group.get(group.member).status_code == 200
    assert group.get(invitee).status_code == 200
    outsider = g.MemberKey.generate()
    assert group.get(outsider).status_code == 403
    unknown = Group(group.client)
    assert unknown.get(unknown.admin).status_code == 404


def test_logs_hold_every_change_signed_by_its_actor(group: Group) -> None:
    group.patch(group.member, g.set_title(group.secrets, "New title"))
    group.patch(group.admin, g.set_announcements_only(True))
    response = group.send(group.member, "GET", "/logs/0")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["currentRevision"] == 2 and not body["more"]
    assert [c["revision"] for c in body["changes"]] == [0, 1, 2]
    assert all(g.verify_change(group.gid, c) for c in body["changes"])
    assert base64.b64decode(body["changes"][1]["actor"]) == group.member.public
    tampered = dict(body["changes"][1], body=base64.b64encode(b"{}").decode())
    assert not g.verify_change(group.gid, tampered)
    assert [c["revision"] for c in group.send(group.admin, "GET", "/logs/2").json()["changes"]] == [2]


def test_logs_from_before_a_member_joined_are_refused_and_outsiders_see_none(group: Group) -> None:
    invitee = group.invite()
    own = g.MemberKey.generate()
    assert group.patch(invitee, g.accept_invite(own, member_blob(group.secrets, own))).status_code == 200
    assert group.send(own, "GET", "/logs/0").status_code == 403
    assert group.send(own, "GET", f"/logs/{group.revision}").status_code == 200
    assert group.send(g.MemberKey.generate(), "GET", "/logs/0").status_code == 403


def test_logs_are_paged(group: Group) -> None:
    for index in range(105):
        assert group.patch(group.admin, g.set_announcements_only(index % 2 == 0)).status_code == 200
    page = group.send(group.admin, "GET", "/logs/0").json()
    assert len(page["changes"]) == 100 and page["more"]
    rest = group.send(group.admin, "GET", "/logs/100").json()
    assert [c["revision"] for c in rest["changes"]] == list(range(100, 106)) and not rest["more"]


# -- permissions: every action, allowed and refused --------------------------------------------------

def _attribute_actions(group: Group) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("modifyTitle", g.set_title(group.secrets, "Renamed")),
        ("modifyDescription", g.set_description(group.secrets, "About us")),
        ("modifyDisappearingTimer", g.set_timer(group.secrets, 3600)),
        ("modifyAvatar", g.set_avatar("avatar-key_1")),
    ]


def _admin_actions(group: Group) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("modifyAttributesAccess", g.set_access("attributes", "ADMIN")),
        ("modifyMembersAccess", g.set_access("members", "ADMIN")),
        ("modifyAddFromInviteLinkAccess", g.set_access("addFromInviteLink", "ANY")),
        ("modifyAnnouncementsOnly", g.set_announcements_only(True)),
        ("modifyInviteLinkPassword", g.set_invite_link(group.secrets, os.urandom(16))),
        ("modifyMemberRole", g.modify_role(group.member.public, "ADMIN")),
        ("removeMember", g.remove_member(group.admin.public)),
    ]


def test_attribute_changes_follow_the_attributes_access(client: TestClient) -> None:
    group = Group(client)
    group.create()
    for name, action in _attribute_actions(group):
        assert group.patch(group.member, action).status_code == 200, name
    assert group.patch(group.admin, g.set_access("attributes", "ADMIN")).status_code == 200
    for name, action in _attribute_actions(group):
        refused(group.patch(group.member, action), name)
        assert group.patch(group.admin, action).status_code == 200, name
    state = group.state()
    assert group.secrets.open("title", base64.b64decode(state["title"])) == b"Renamed"
    assert state["avatar"] == "avatar-key_1"


def test_admin_only_settings_are_refused_to_members_and_allowed_to_admins(client: TestClient) -> None:
    for name, _ in _admin_actions(Group(client)):
        group = Group(client)
        group.create()
        action = dict(_admin_actions(group))[name]
        refused(group.patch(group.member, action), name)
        if name == "removeMember":  # the admin removing someone else
            action = g.remove_member(group.member.public)
        assert group.patch(group.admin, action).status_code == 200, name


def test_invitations_follow_the_members_access_and_only_admins_invite_admins(client: TestClient) -> None:
    group = Group(client)
    group.create()
    assert group.invite(by=group.member)  # members: MEMBER
    invite_key = g.MemberKey.generate()
    refused(group.patch(group.member, g.invite(invite_key, member_blob(group.secrets, invite_key), "ADMIN")),
            "addPendingMember")
    assert group.invite(by=group.admin, role="ADMIN")
    assert group.patch(group.admin, g.set_access("members", "ADMIN")).status_code == 200
    refused(group.patch(group.member, g.invite(invite_key, member_blob(group.secrets, invite_key))), "addPendingMember")
    assert group.invite(by=group.admin)
    outsider = g.MemberKey.generate()
    response = group.patch(outsider, g.invite(invite_key, member_blob(group.secrets, invite_key)))
    assert response.status_code == 403


def test_removing_others_needs_an_admin_but_anyone_may_leave(client: TestClient) -> None:
    group = Group(client)
    other = g.MemberKey.generate()
    group.create(extra_members=[other])
    refused(group.patch(group.member, g.remove_member(other.public)), "removeMember")
    assert group.patch(group.member, g.remove_member(group.member.public)).status_code == 200
    assert group.patch(group.admin, g.remove_member(other.public)).status_code == 200
    assert [m["role"] for m in group.state()["members"]] == ["ADMIN"]


def test_role_changes_need_an_admin(group: Group) -> None:
    refused(group.patch(group.member, g.modify_role(group.member.public, "ADMIN")), "modifyMemberRole")
    assert group.patch(group.admin, g.modify_role(group.member.public, "ADMIN")).status_code == 200
    assert group.patch(group.member, g.modify_role(group.admin.public, "MEMBER")).status_code == 200


def test_pending_invitations_are_withdrawn_by_admins_or_their_inviter(client: TestClient) -> None:
    group = Group(client)
    other = g.MemberKey.generate()
    group.create(extra_members=[other])
    by_member = group.invite(by=group.member)
    by_admin = group.invite(by=group.admin)
    refused(group.patch(other, g.remove_pending(by_member.public)), "removePendingMember")
    refused(group.patch(group.member, g.remove_pending(by_admin.public)), "removePendingMember")
    assert group.patch(group.member, g.remove_pending(by_member.public)).status_code == 200
    assert group.patch(group.admin, g.remove_pending(by_admin.public)).status_code == 200
    assert group.state()["pendingMembers"] == []


def test_an_invitee_accepts_with_its_own_key_or_declines(group: Group) -> None:
    invitee = group.invite(role="ADMIN")
    own = g.MemberKey.generate()
    # Only the invite key may accept; a member cannot accept on the invitee's behalf.
    refused(group.patch(group.member, g.accept_invite(own, member_blob(group.secrets, own))), "acceptInvite")
    assert group.patch(invitee, g.accept_invite(invitee, member_blob(group.secrets, invitee))).status_code == 400
    assert group.patch(invitee, g.accept_invite(own, member_blob(group.secrets, own))).status_code == 200
    state = group.state()
    assert {m["publicKey"]: m["role"] for m in state["members"]}[own.public_b64] == "ADMIN"
    assert state["pendingMembers"] == []
    # The invite key is spent: it can neither read nor act any more.
    assert group.get(invitee).status_code == 403
    second = group.invite()
    refused(group.patch(group.member, g.decline_invite()), "declineInvite")
    assert group.patch(second, g.decline_invite()).status_code == 200
    assert group.get(second).status_code == 403


def test_an_invitee_can_do_nothing_but_accept_or_decline(group: Group) -> None:
    invitee = group.invite()
    refused(group.patch(invitee, g.set_title(group.secrets, "mine now")), "modifyTitle")
    refused(group.patch(invitee, g.remove_member(group.member.public)), "removeMember")


# -- the last administrator ------------------------------------------------------------------------

def test_the_last_admin_must_promote_someone_before_leaving_or_stepping_down(group: Group) -> None:
    refused(group.patch(group.admin, g.remove_member(group.admin.public)), "removeMember")
    refused(group.patch(group.admin, g.modify_role(group.admin.public, "MEMBER")), "modifyMemberRole")
    response = group.patch(
        group.admin, g.modify_role(group.member.public, "ADMIN"), g.remove_member(group.admin.public)
    )
    assert response.status_code == 200
    assert [m["role"] for m in response.json()["members"]] == ["ADMIN"]


def test_a_sole_member_admin_may_leave(client: TestClient) -> None:
    group = Group(client)
    document = g.new_group_state(group.secrets, group.admin, member_blob(group.secrets, group.admin))
    assert group.send(group.admin, "PUT", document=document).status_code == 200
    assert group.patch(group.admin, g.remove_member(group.admin.public)).status_code == 200


# -- revisions, atomicity, concurrency --------------------------------------------------------------

def test_a_change_is_all_or_nothing_and_names_the_first_refused_action(group: Group) -> None:
    response = group.patch(group.member, g.set_title(group.secrets, "changed"), g.set_announcements_only(True))
    refused(response, "modifyAnnouncementsOnly", 1)
    state = group.state()
    assert state["revision"] == 0 and state["title"] is not None
    assert group.secrets.open("title", base64.b64decode(state["title"])) == b"Book club"
    bad = group.patch(group.admin, g.set_title(group.secrets, "x"), {"type": "launchMissiles"})
    assert bad.status_code == 400 and bad.json()["index"] == 1
    assert group.patch(group.admin, g.remove_member(os.urandom(32))).status_code == 400


@pytest.mark.parametrize("offset", [0, 2, -1])
def test_a_change_not_at_the_next_revision_is_409_with_the_current_one(group: Group, offset: int) -> None:
    group.patch(group.admin, g.set_announcements_only(True))
    response = group.patch(group.admin, g.set_announcements_only(False), revision=group.revision + offset)
    assert response.status_code == 409
    assert response.json()["revision"] == 1


def test_two_admins_at_the_same_revision_one_wins_one_gets_409(client: TestClient) -> None:
    group = Group(client)
    group.create()
    assert group.patch(group.admin, g.modify_role(group.member.public, "ADMIN")).status_code == 200
    results: list[Any] = []
    barrier = threading.Barrier(2)

    def change(key: g.MemberKey, title: str) -> None:
        body, headers = g.signed(key, group.gid, "PATCH", group.path(),
                                 g.change(2, g.set_title(group.secrets, title)))
        barrier.wait()
        results.append(client.patch(group.path(), content=body, headers=headers))

    threads = [threading.Thread(target=change, args=(key, name))
               for key, name in ((group.admin, "first"), (group.member, "second"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in results) == [200, 409]
    loser = next(r for r in results if r.status_code == 409)
    assert loser.json()["revision"] == 2
    logs = group.send(group.admin, "GET", "/logs/2").json()["changes"]
    assert len(logs) == 1


# -- removal takes effect at once -----------------------------------------------------------------------

def test_a_removed_member_key_stops_working_at_once(group: Group) -> None:
    assert group.get(group.member).status_code == 200
    assert group.patch(group.admin, g.remove_member(group.member.public)).status_code == 200
    assert group.get(group.member).status_code == 403
    assert group.send(group.member, "GET", "/logs/1").status_code == 403
    response = group.patch(group.member, g.set_title(group.secrets, "still here?"))
    assert response.status_code == 403


def test_demotion_takes_effect_for_the_next_request(client: TestClient) -> None:
    group = Group(client)
    group.create()
    group.patch(group.admin, g.modify_role(group.member.public, "ADMIN"))
    assert group.patch(group.member, g.set_announcements_only(True)).status_code == 200
    assert group.patch(group.admin, g.modify_role(group.member.public, "MEMBER")).status_code == 200
    refused(group.patch(group.member, g.set_announcements_only(False)), "modifyAnnouncementsOnly")


# -- joining by invite link -------------------------------------------------------------------------------

def _join(group: Group, password: bytes) -> tuple[g.MemberKey, Any]:
    joiner = g.MemberKey.generate()
    return joiner, group.send(joiner, "POST", "/join", document=g.join_request(password,
                                                                               member_blob(group.secrets, joiner)))


def test_join_by_link_without_approval_makes_a_member(group: Group) -> None:
    password = os.urandom(16)
    group.patch(group.admin, g.set_invite_link(group.secrets, password), g.set_access("addFromInviteLink", "ANY"))
    joiner, response = _join(group, password)
    assert response.status_code == 200, response.text
    state = response.json()
    assert {m["publicKey"]: m["role"] for m in state["members"]}[joiner.public_b64] == "MEMBER"
    assert group.get(joiner).status_code == 200
    # Members can read the link password back from its sealed copy.
    sealed = base64.b64decode(group.state()["encryptedInviteLinkPassword"])
    assert group.secrets.open("encryptedInviteLinkPassword", sealed) == password
    again = group.send(joiner, "POST", "/join", document=g.join_request(password, member_blob(group.secrets, joiner)))
    assert again.status_code == 409


def test_join_by_link_with_approval_waits_for_an_admin(group: Group) -> None:
    password = os.urandom(16)
    group.patch(group.admin, g.set_invite_link(group.secrets, password),
                g.set_access("addFromInviteLink", "ADMINISTRATOR"))
    joiner, response = _join(group, password)
    assert response.status_code == 200
    assert [r["publicKey"] for r in response.json()["requestingMembers"]] == [joiner.public_b64]
    assert group.get(joiner).status_code == 403  # not a member yet
    group.revision = response.json()["revision"]
    refused(group.patch(group.member, g.approve_request(joiner.public)), "approveRequestingMember")
    assert group.patch(group.admin, g.approve_request(joiner.public)).status_code == 200
    assert group.get(joiner).status_code == 200
    # Another requester withdraws; a third is denied by an admin, not by a member.
    second, _ = _join(group, password)
    third, response = _join(group, password)
    group.revision = response.json()["revision"]
    assert group.patch(second, g.deny_request(second.public)).status_code == 200
    refused(group.patch(group.member, g.deny_request(third.public)), "denyRequestingMember")
    assert group.patch(group.admin, g.deny_request(third.public)).status_code == 200
    assert group.state()["requestingMembers"] == []


def test_join_is_refused_with_a_wrong_or_cleared_password_or_when_links_are_off(group: Group) -> None:
    password = os.urandom(16)
    assert _join(group, password)[1].status_code == 403  # no link set, UNSATISFIABLE
    group.patch(group.admin, g.set_invite_link(group.secrets, password), g.set_access("addFromInviteLink", "ANY"))
    assert _join(group, os.urandom(16))[1].status_code == 403
    group.patch(group.admin, g.set_invite_link(group.secrets, None))
    assert _join(group, password)[1].status_code == 403
    group.patch(
        group.admin, g.set_invite_link(group.secrets, password), g.set_access("addFromInviteLink", "UNSATISFIABLE")
    )
    assert _join(group, password)[1].status_code == 403
    short = group.patch(group.admin, g.set_invite_link(group.secrets, os.urandom(8)))
    assert short.status_code == 400


# -- limits ------------------------------------------------------------------------------------------

def test_the_member_limit_counts_members_and_invitations(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with custom_client(backend, tmp_path, request, groups={"max_members": 4}) as client:
        group = Group(client)
        group.create()  # 2 members
        group.invite()
        group.invite()
        key = g.MemberKey.generate()
        refused(group.patch(group.admin, g.invite(key, member_blob(group.secrets, key))), "addPendingMember")
        too_big = Group(client)
        extra = [g.MemberKey.generate() for _ in range(4)]  # with the admin: 5 > 4
        members = [g.member_entry(k.public, "MEMBER", member_blob(too_big.secrets, k)) for k in extra]
        document = g.new_group_state(too_big.secrets, too_big.admin, member_blob(too_big.secrets, too_big.admin),
                                     members=members)
        assert too_big.send(too_big.admin, "PUT", document=document).status_code == 403


def test_a_thousand_member_group_is_created_and_changed(client: TestClient) -> None:
    group = Group(client)
    keys = [g.MemberKey.generate() for _ in range(998)]
    group.create(extra_members=keys)  # admin + member + 998
    assert len(group.state()["members"]) == 1000
    key = g.MemberKey.generate()
    refused(group.patch(group.admin, g.invite(key, member_blob(group.secrets, key))), "addPendingMember")
    assert group.patch(keys[500], g.remove_member(keys[500].public)).status_code == 200
    assert group.invite()


# -- what the server holds --------------------------------------------------------------------------------

def test_group_tables_hold_no_account_id_number_or_plaintext_attribute(client: TestClient) -> None:
    import sqlalchemy as sa

    from mailslot.backends.sql.social_tables import group_changes, groups
    from tests.api.foundation_support import services

    alice = register(client, "+15555550001")
    group = Group(client)
    aci = uuid.UUID(alice.aci)
    admin_blob = group.secrets.seal_member(g.MemberRecord(aci, os.urandom(32), group.admin.public,
                                                          g.binding_signature(alice.aci_identity.private, group.gid,
                                                                              group.admin.public)))
    document = g.new_group_state(group.secrets, group.admin, admin_blob, title="Secret Book Club",
                                 description="We meet on Tuesdays")
    assert group.send(group.admin, "PUT", document=document).status_code == 200
    group.patch(group.admin, g.set_title(group.secrets, "Even More Secret"))
    # The member record opens with the state key and its binding verifies (client side).
    record = group.secrets.open_member(base64.b64decode(group.state()["members"][0]["encryptedMember"]))
    assert record.aci == aci and g.verify_binding(alice.aci_identity.public, group.gid, record)

    store = services(client).groups.store

    async def dump() -> bytes:
        async with store.db.read() as conn:  # type: ignore[attr-defined]
            rows = [*(await conn.execute(sa.select(groups))).all()]
            rows += (await conn.execute(sa.select(group_changes))).all()
        return b"".join(repr(tuple(row)).encode() for row in rows)

    raw = call(client, dump)
    for needle in (alice.aci.encode(), aci.bytes, aci.hex.encode(), alice.number.encode(), alice.number[1:].encode(),
                   b"Secret Book Club", b"Even More Secret", b"Tuesdays"):
        assert needle not in raw, needle
    assert len(raw) > 1000  # the scan saw the rows


# -- bad input never breaks anything --------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_action_types = st.sampled_from(sorted(["addPendingMember", "removeMember", "modifyMemberRole", "acceptInvite",
                                        "modifyTitle", "modifyAvatar", "modifyInviteLinkPassword", "nonsense"]))


@hyp_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    revision=st.one_of(st.integers(-3, 5), st.text(max_size=3), st.none()),
    actions=st.lists(st.fixed_dictionaries({"type": _action_types}, optional={
        "publicKey": st.one_of(st.text(max_size=50), st.binary(min_size=32, max_size=32).map(
            lambda b: base64.b64encode(b).decode())),
        "role": st.sampled_from(["ADMIN", "MEMBER", "OWNER", ""]),
        "title": _json_values, "avatar": _json_values, "password": _json_values,
        "encryptedMember": _json_values,
    }), max_size=4) | _json_values,
)
def test_signed_garbage_changes_get_4xx_json_and_change_nothing(group: Group, revision: Any, actions: Any) -> None:
    before = group.state()
    response = group.send(group.member, "PATCH", document={"revision": revision, "actions": actions})
    if response.status_code == 200:  # a well-formed change a member may make is fine; anything else is not
        group.revision = response.json()["revision"]
        return
    assert 400 <= response.status_code < 500, response.text
    assert "code" in response.json()
    after = group.state()
    assert after == before


@hyp_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=200), body=st.binary(max_size=300))
def test_garbage_group_auth_headers_and_bodies_get_4xx(group: Group, header: str, body: bytes) -> None:
    for method in ("GET", "PATCH", "PUT", "POST"):
        suffix = "/join" if method == "POST" else ""
        response = group.client.request(method, group.path(suffix), content=body,
                                        headers={"Group-Auth": header.strip() or "x"})
        assert 400 <= response.status_code < 500, response.text
    assert group.state()["revision"] == group.revision
