"""A group as a test drives it: keys of an admin, a member, an invitee and a requester, and signed
requests built with the client reference module (mailslot.client.groups)."""

from __future__ import annotations

import os
import uuid
from typing import Any

from fastapi.testclient import TestClient

from mailslot.client import groups as g


def member_blob(secrets: g.GroupSecrets, key: g.MemberKey, aci: uuid.UUID | None = None) -> bytes:
    record = g.MemberRecord(aci or uuid.uuid4(), os.urandom(32), key.public, os.urandom(64))
    return secrets.seal_member(record)


class Group:
    def __init__(self, client: TestClient, access: dict[str, str] | None = None) -> None:
        self.client = client
        self.secrets = g.GroupSecrets.generate()
        self.admin = g.MemberKey.generate()
        self.member = g.MemberKey.generate()
        self.revision = 0
        self.access = access or {"attributes": "MEMBER", "members": "MEMBER", "addFromInviteLink": "UNSATISFIABLE"}

    @property
    def gid(self) -> bytes:
        return self.secrets.group_id

    def path(self, suffix: str = "") -> str:
        return g.group_path(self.gid, suffix)

    def create(self, title: str = "Book club", extra_members: list[g.MemberKey] | None = None) -> Any:
        members = [g.member_entry(self.member.public, "MEMBER", member_blob(self.secrets, self.member))]
        for key in extra_members or []:
            members.append(g.member_entry(key.public, "MEMBER", member_blob(self.secrets, key)))
        document = g.new_group_state(self.secrets, self.admin, member_blob(self.secrets, self.admin), title=title,
                                     members=members, access=self.access)
        response = self.send(self.admin, "PUT", document=document)
        assert response.status_code == 200, response.text
        return response

    def send(self, key: g.MemberKey, method: str, suffix: str = "", document: Any = None,
             timestamp_ms: int | None = None, headers: dict[str, str] | None = None) -> Any:
        path = self.path(suffix)
        body, signed_headers = g.signed(key, self.gid, method, path, document, timestamp_ms)
        return self.client.request(method, path, content=body or None, headers={**signed_headers, **(headers or {})})

    def get(self, key: g.MemberKey) -> Any:
        return self.send(key, "GET")

    def patch(self, key: g.MemberKey, *actions: dict[str, Any], revision: int | None = None) -> Any:
        response = self.send(key, "PATCH", document=g.change(self.revision + 1 if revision is None else revision,
                                                               *actions))
        if response.status_code == 200:
            self.revision = response.json()["revision"]
        return response

    def invite(self, by: g.MemberKey | None = None, role: str = "MEMBER") -> g.MemberKey:
        invite_key = g.MemberKey.generate()
        response = self.patch(by or self.admin, g.invite(invite_key, member_blob(self.secrets, invite_key), role))
        assert response.status_code == 200, response.text
        return invite_key

    def state(self) -> dict[str, Any]:
        response = self.get(self.admin)
        assert response.status_code == 200, response.text
        return dict(response.json())
