"""The group service (GROUPS.md): the server enforces who may change a group without learning who is
in it. Requests are authorised by Group-Auth (a per-group member key's signature), never by accounts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

from mailslot.crypto.groupauth import GroupAuth, parse_header
from mailslot.services.errors import ServiceError
from mailslot.services.group_actions import apply_actions, password_hash
from mailslot.services.group_state import GroupState, Member, RequestingMember, b64decode, blob, invalid
from mailslot.stores.groups import GroupChangeRecord, GroupStore, ReplayCache

CLOCK_SKEW_MS = 5 * 60 * 1000
REPLAY_SECONDS = 10 * 60
LOG_PAGE = 100
JOIN_RETRIES = 5


def group_auth_error(message: str) -> ServiceError:
    return ServiceError(401, "group_auth", message, headers={"WWW-Authenticate": "Group-Auth"})


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """A group request as the actor signed it."""

    group_id: bytes
    method: str
    path: str  # with its query string
    body: bytes
    header: str | None


class AvatarBlobs(Protocol):
    async def delete_group_avatar(self, key: str) -> None: ...


class GroupService:
    def __init__(self, store: GroupStore, replay: ReplayCache, max_members: int = 1000) -> None:
        self.store = store
        self.replay = replay
        self.max_members = max_members
        # Set by the composition root when media are offered: a replaced group avatar is deleted.
        self.avatars: AvatarBlobs | None = None

    # -- Group-Auth -------------------------------------------------------------------------------

    async def authenticate(self, request: SignedRequest) -> GroupAuth:
        if not request.header:
            raise group_auth_error("a Group-Auth header is required")
        auth = parse_header(request.header)
        if auth is None:
            raise group_auth_error("malformed Group-Auth header")
        if abs(time.time() * 1000 - auth.timestamp_ms) > CLOCK_SKEW_MS:
            raise group_auth_error("the Group-Auth time is more than 5 minutes from the server's")
        if not auth.verify(request.group_id, request.method, request.path, request.body):
            raise group_auth_error("the Group-Auth signature does not verify")
        if not await self.replay.first_use(hashlib.sha256(auth.signature).digest(), REPLAY_SECONDS):
            raise group_auth_error("this Group-Auth signature was already used")
        return auth

    @staticmethod
    def _record(revision: int, auth: GroupAuth, request: SignedRequest) -> GroupChangeRecord:
        return GroupChangeRecord(revision, auth.public_key, auth.timestamp_ms, auth.signature, request.method,
                                 request.path, request.body)

    async def _load(self, group_id: bytes) -> GroupState:
        stored = await self.store.get(group_id)
        if stored is None:
            raise ServiceError(404, "not_found", "no such group")
        return GroupState.from_json(json.loads(stored[1]), trusted=True)

    @staticmethod
    def _dump(state: GroupState) -> str:
        return json.dumps(state.to_json(), separators=(",", ":"))

    # -- endpoints --------------------------------------------------------------------------------

    async def create(self, request: SignedRequest, document: Any) -> dict[str, Any]:
        auth = await self.authenticate(request)
        state = GroupState.from_json(document)
        if state.revision != 0:
            raise invalid("a new group starts at revision 0")
        if state.role_of(auth.public_key) != "ADMIN":
            raise ServiceError(403, "forbidden", "the creator's key must be an administrator of the new group")
        if state.requesting:
            raise invalid("a new group has no requests to join")
        if any(p.added_by not in state.members for p in state.pending.values()):
            raise invalid("pendingMembers.addedBy: must be a member's key")
        if state.size() > self.max_members:
            raise ServiceError(403, "forbidden", f"a group holds at most {self.max_members} members and invitations")
        if not await self.store.create(request.group_id, self._dump(state), self._record(0, auth, request),
                                       state.avatar):
            raise ServiceError(409, "conflict", "a group with this id exists", body={
                "code": "conflict", "message": "a group with this id exists"})
        return state.to_json()

    async def get(self, request: SignedRequest) -> dict[str, Any]:
        auth = await self.authenticate(request)
        state = await self._load(request.group_id)
        # An invitee may look at the group it is invited to (to accept or decline at the right revision).
        if auth.public_key not in state.members and auth.public_key not in state.pending:
            raise ServiceError(403, "forbidden", "only members may read the group")
        return state.to_json()

    async def logs(self, request: SignedRequest, from_revision: int) -> dict[str, Any]:
        auth = await self.authenticate(request)
        state = await self._load(request.group_id)
        member = state.members.get(auth.public_key)
        if member is None:
            raise ServiceError(403, "forbidden", "only members may read the group's changes")
        if from_revision < member.joined_at_revision:
            raise ServiceError(403, "forbidden", "changes from before this member joined are not shown")
        changes = await self.store.changes(request.group_id, from_revision, LOG_PAGE + 1)
        more = len(changes) > LOG_PAGE
        return {
            "currentRevision": state.revision,
            "changes": [_change_json(c) for c in changes[:LOG_PAGE]],
            "more": more,
        }

    async def patch(self, request: SignedRequest, change: Any) -> dict[str, Any]:
        auth = await self.authenticate(request)
        if not isinstance(change, dict):
            raise invalid("the change must be a JSON object")
        revision = change.get("revision")
        if not isinstance(revision, int) or isinstance(revision, bool):
            raise invalid("revision: must be an integer")
        state = await self._load(request.group_id)
        if not state.holds(auth.public_key):
            raise ServiceError(403, "forbidden", "only members, invitees and requesters may change the group")
        if revision != state.revision + 1:
            raise _conflict(state.revision)
        new_state = apply_actions(state, auth.public_key, change.get("actions"), revision, self.max_members)
        if not await self.store.update(request.group_id, state.revision, self._dump(new_state),
                                       self._record(revision, auth, request), new_state.avatar):
            current = await self.store.get(request.group_id)
            raise _conflict(current[0] if current else state.revision)
        if state.avatar and state.avatar != new_state.avatar and self.avatars is not None:
            await self.avatars.delete_group_avatar(state.avatar)
        return new_state.to_json()

    async def join(self, request: SignedRequest, body: Any) -> dict[str, Any]:
        """By invite link: the Group-Auth key is the joiner's new member key; the password is the proof."""
        auth = await self.authenticate(request)
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object")
        password = b64decode(body.get("password"), "password")
        encrypted = blob(body.get("encryptedMember"), "encryptedMember", optional=False) or b""
        for _ in range(JOIN_RETRIES):
            state = await self._load(request.group_id)
            link = state.access.add_from_invite_link
            expected = state.invite_link_password_hash
            proven = expected is not None and hmac.compare_digest(expected, password_hash(password))
            if link == "UNSATISFIABLE" or not proven:
                raise ServiceError(403, "forbidden", "the invite link is not valid for this group")
            if state.holds(auth.public_key):
                raise ServiceError(409, "conflict", "this key is already in the group",
                                   body={"code": "conflict", "message": "this key is already in the group",
                                         "revision": state.revision})
            revision = state.revision + 1
            new_state = GroupState.from_json(state.to_json(), trusted=True)
            if link == "ANY":
                new_state.members[auth.public_key] = Member(auth.public_key, "MEMBER", encrypted, revision)
            else:
                new_state.requesting[auth.public_key] = RequestingMember(auth.public_key, encrypted, revision)
            if new_state.size() > self.max_members or len(new_state.requesting) > self.max_members:
                raise ServiceError(403, "forbidden", "the group is full")
            new_state.revision = revision
            if await self.store.update(request.group_id, state.revision, self._dump(new_state),
                                       self._record(revision, auth, request), new_state.avatar):
                return new_state.to_json()
        raise ServiceError(503, "busy", "the group is changing too fast; try again")

    async def authorize_attribute_change(self, request: SignedRequest) -> GroupState:
        """For the avatar upload form: a member whom the attributes access lets change the avatar."""
        auth = await self.authenticate(request)
        state = await self._load(request.group_id)
        role = state.role_of(auth.public_key)
        if role is None or (state.access.attributes == "ADMIN" and role != "ADMIN"):
            raise ServiceError(403, "forbidden", "only members allowed to change the group's attributes may do this")
        return state


def _conflict(current: int) -> ServiceError:
    return ServiceError(409, "conflict", "the group has changed; fetch it and try again",
                        body={"code": "conflict", "message": "the group has changed", "revision": current})


def _change_json(change: GroupChangeRecord) -> dict[str, Any]:
    return {
        "revision": change.revision,
        "actor": base64.b64encode(change.actor).decode(),
        "timestamp": change.timestamp_ms,
        "signature": base64.b64encode(change.signature).decode(),
        "method": change.method,
        "path": change.path,
        "body": base64.b64encode(change.body).decode(),
    }
