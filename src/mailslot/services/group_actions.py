"""The actions of a group change and who may take each (GROUPS.md "Actions").

``apply_actions`` checks every action against the state as the previous actions left it, and either
returns the new state or raises: 403 naming the first refused action (``action`` and ``index`` in the
body), 400 for an action that is malformed or refers to a key that is not there.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import Any

from mailslot.services.errors import ServiceError
from mailslot.services.group_state import (
    LINK_ACCESS,
    MEMBER_ACCESS,
    ROLES,
    GroupState,
    Member,
    PendingMember,
    avatar,
    b64decode,
    blob,
    choice,
    member_key,
)

MAX_ACTIONS = 1000
MIN_PASSWORD_BYTES = 16
MAX_PASSWORD_BYTES = 64


class Refused(Exception):
    """An action the actor may not take: becomes 403 naming the action."""


class Invalid(Exception):
    """An action that is malformed or refers to nothing: becomes 400 naming the action."""


class ChangeContext:
    def __init__(self, state: GroupState, actor: bytes, revision: int, max_members: int) -> None:
        self.state = state
        self.actor = actor
        self.revision = revision
        self.max_members = max_members

    @property
    def actor_role(self) -> str | None:
        return self.state.role_of(self.actor)

    def require_member(self) -> str:
        role = self.actor_role
        if role is None:
            raise Refused("only members may do this")
        return role

    def require_admin(self) -> None:
        if self.require_member() != "ADMIN":
            raise Refused("only administrators may do this")

    def require_access(self, needed: str) -> None:
        role = self.require_member()
        if needed == "ADMIN" and role != "ADMIN":
            raise Refused("the group's access control allows only administrators to do this")

    def check_size(self) -> None:
        if self.state.size() > self.max_members:
            raise Refused(f"the group would exceed {self.max_members} members and invitations")
        if len(self.state.requesting) > self.max_members:
            raise Refused("too many requests to join")


def _key(action: dict[str, Any], name: str = "publicKey") -> bytes:
    try:
        return member_key(action.get(name), name)
    except ServiceError as exc:
        raise Invalid(exc.message) from exc


def _removes_last_admin(ctx: ChangeContext, key: bytes) -> bool:
    member = ctx.state.members.get(key)
    return member is not None and member.role == "ADMIN" and ctx.state.admins() == 1 and len(ctx.state.members) > 1


# -- membership ---------------------------------------------------------------------------------

def add_pending_member(ctx: ChangeContext, action: dict[str, Any]) -> None:
    ctx.require_access(ctx.state.access.members)
    key = _key(action)
    role = choice(action.get("role", "MEMBER"), ROLES, "role")
    if role == "ADMIN":
        ctx.require_admin()
    if ctx.state.holds(key):
        raise Invalid("that key is already in the group")
    encrypted = blob(action.get("encryptedMember"), "encryptedMember", optional=False) or b""
    ctx.state.pending[key] = PendingMember(key, role, encrypted, ctx.actor, ctx.revision)
    ctx.check_size()


def remove_member(ctx: ChangeContext, action: dict[str, Any]) -> None:
    key = _key(action)
    if key != ctx.actor:
        ctx.require_admin()
    else:
        ctx.require_member()
    if key not in ctx.state.members:
        raise Invalid("no such member")
    if _removes_last_admin(ctx, key):
        raise Refused("the last administrator must make another member an administrator first")
    del ctx.state.members[key]


def modify_member_role(ctx: ChangeContext, action: dict[str, Any]) -> None:
    ctx.require_admin()
    key = _key(action)
    role = choice(action.get("role"), ROLES, "role")
    member = ctx.state.members.get(key)
    if member is None:
        raise Invalid("no such member")
    if role == "MEMBER" and _removes_last_admin(ctx, key):
        raise Refused("the last administrator must make another member an administrator first")
    member.role = role


def remove_pending_member(ctx: ChangeContext, action: dict[str, Any]) -> None:
    key = _key(action)
    pending = ctx.state.pending.get(key)
    if pending is None:
        raise Invalid("no such pending member")
    if pending.added_by != ctx.actor:
        ctx.require_admin()  # an inviter may take back their own invitation
    del ctx.state.pending[key]


def accept_invite(ctx: ChangeContext, action: dict[str, Any]) -> None:
    """Signed by the invite key: the pending entry becomes a member under the invitee's own key."""
    pending = ctx.state.pending.get(ctx.actor)
    if pending is None:
        raise Refused("only the holder of a pending invitation may accept it")
    key = _key(action)
    if ctx.state.holds(key) and key != ctx.actor:
        raise Invalid("that key is already in the group")
    if key == ctx.actor:
        raise Invalid("the member key must be the invitee's own, not the invite key")
    encrypted = blob(action.get("encryptedMember"), "encryptedMember", optional=False) or b""
    del ctx.state.pending[ctx.actor]
    ctx.state.members[key] = Member(key, pending.role, encrypted, ctx.revision)


def decline_invite(ctx: ChangeContext, action: dict[str, Any]) -> None:
    if ctx.actor not in ctx.state.pending:
        raise Refused("only the holder of a pending invitation may decline it")
    del ctx.state.pending[ctx.actor]


def approve_requesting_member(ctx: ChangeContext, action: dict[str, Any]) -> None:
    ctx.require_admin()
    key = _key(action)
    request = ctx.state.requesting.pop(key, None)
    if request is None:
        raise Invalid("no such request to join")
    role = choice(action.get("role", "MEMBER"), ROLES, "role")
    ctx.state.members[key] = Member(key, role, request.encrypted_member, ctx.revision)
    ctx.check_size()


def deny_requesting_member(ctx: ChangeContext, action: dict[str, Any]) -> None:
    key = _key(action)
    if key not in ctx.state.requesting:
        raise Invalid("no such request to join")
    if key != ctx.actor:
        ctx.require_admin()  # a requester may withdraw their own request
    del ctx.state.requesting[key]


# -- attributes ---------------------------------------------------------------------------------

Action = Callable[[ChangeContext, dict[str, Any]], None]


def _attribute(name: str, field: str, parse: Callable[[Any], Any]) -> Action:
    def action(ctx: ChangeContext, body: dict[str, Any]) -> None:
        ctx.require_access(ctx.state.access.attributes)
        setattr(ctx.state, field, parse(body.get(name)))

    return action


def _admin_setting(apply: Callable[[GroupState, dict[str, Any]], None]) -> Action:
    def action(ctx: ChangeContext, body: dict[str, Any]) -> None:
        ctx.require_admin()
        apply(ctx.state, body)

    return action


def _set_invite_link_password(state: GroupState, body: dict[str, Any]) -> None:
    password = body.get("password")
    if password is None:
        state.invite_link_password_hash = None
        state.encrypted_invite_link_password = None
        return
    raw = b64decode(password, "password")
    if not MIN_PASSWORD_BYTES <= len(raw) <= MAX_PASSWORD_BYTES:
        raise Invalid(f"password: must be {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} random bytes")
    state.invite_link_password_hash = password_hash(raw)
    state.encrypted_invite_link_password = blob(body.get("encryptedPassword"), "encryptedInviteLinkPassword")


def password_hash(password: bytes) -> bytes:
    # The password is random (≥ 16 bytes), so a plain hash cannot be searched; it is compared in
    # constant time.
    return hashlib.sha256(b"mailslot-group-link-v1" + password).digest()


def _access(field: str, allowed: tuple[str, ...]) -> Callable[[GroupState, dict[str, Any]], None]:
    def apply(state: GroupState, body: dict[str, Any]) -> None:
        setattr(state.access, field, choice(body.get("access"), allowed, "access"))

    return apply


def _announcements(state: GroupState, body: dict[str, Any]) -> None:
    value = body.get("announcementsOnly")
    if not isinstance(value, bool):
        raise Invalid("announcementsOnly: must be true or false")
    state.announcements_only = value


ACTIONS: dict[str, Action] = {
    "addPendingMember": add_pending_member,
    "removeMember": remove_member,
    "modifyMemberRole": modify_member_role,
    "removePendingMember": remove_pending_member,
    "acceptInvite": accept_invite,
    "declineInvite": decline_invite,
    "approveRequestingMember": approve_requesting_member,
    "denyRequestingMember": deny_requesting_member,
    "modifyTitle": _attribute("title", "title", lambda v: blob(v, "title")),
    "modifyAvatar": _attribute("avatar", "avatar", avatar),
    "modifyDescription": _attribute("description", "description", lambda v: blob(v, "description")),
    "modifyDisappearingTimer": _attribute(
        "disappearingTimer", "disappearing_timer", lambda v: blob(v, "disappearingTimer")
    ),
    "modifyAttributesAccess": _admin_setting(_access("attributes", MEMBER_ACCESS)),
    "modifyMembersAccess": _admin_setting(_access("members", MEMBER_ACCESS)),
    "modifyAddFromInviteLinkAccess": _admin_setting(_access("add_from_invite_link", LINK_ACCESS)),
    "modifyAnnouncementsOnly": _admin_setting(_announcements),
    "modifyInviteLinkPassword": _admin_setting(_set_invite_link_password),
}


def apply_actions(
    state: GroupState, actor: bytes, actions: Any, revision: int, max_members: int
) -> GroupState:
    """The state after ``actions`` (all or nothing: ``state`` itself is left as it was)."""
    if not isinstance(actions, list) or not actions:
        raise ServiceError(400, "invalid_group", "actions: must be a non-empty list")
    if len(actions) > MAX_ACTIONS:
        raise ServiceError(400, "invalid_group", f"actions: at most {MAX_ACTIONS} per change")
    ctx = ChangeContext(copy.deepcopy(state), actor, revision, max_members)
    for index, action in enumerate(actions):
        kind = action.get("type") if isinstance(action, dict) else None
        handler = ACTIONS.get(kind) if isinstance(kind, str) else None
        if handler is None or not isinstance(action, dict):
            raise ServiceError(400, "invalid_action", f"actions[{index}]: unknown action type",
                               body={"code": "invalid_action", "message": "unknown action type",
                                     "action": kind if isinstance(kind, str) else None, "index": index})
        try:
            handler(ctx, action)
        except Refused as exc:
            raise ServiceError(403, "forbidden", str(exc), body={
                "code": "forbidden", "message": str(exc), "action": kind, "index": index}) from exc
        except (Invalid, ServiceError) as exc:
            message = exc.message if isinstance(exc, ServiceError) else str(exc)
            raise ServiceError(400, "invalid_action", message, body={
                "code": "invalid_action", "message": message, "action": kind, "index": index}) from exc
    ctx.state.revision = revision
    return ctx.state
