"""Tables of groups (GROUPS.md) and of blocks: nothing in them names an account in the clear.

A group row holds only the group id, its revision and the state document of opaque client-encrypted
blobs and per-group member keys; block rows hold HMACs under a per-account key sealed at rest.
"""

from __future__ import annotations

import sqlalchemy as sa

from mailslot.backends.sql.tables import metadata

groups = sa.Table(
    "groups",
    metadata,
    sa.Column("group_id", sa.LargeBinary(32), primary_key=True),
    sa.Column("revision", sa.Integer, nullable=False),
    # The state document (JSON): encrypted attributes, access control, member keys, roles, blobs.
    sa.Column("state", sa.Text, nullable=False),
    # The avatar's blob key, also inside the state: kept apart so orphaned avatars can be found.
    sa.Column("avatar", sa.String(128), nullable=True, index=True),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
)

group_changes = sa.Table(
    "group_changes",
    metadata,
    sa.Column("group_id", sa.LargeBinary(32), primary_key=True),
    sa.Column("revision", sa.Integer, primary_key=True, autoincrement=False),
    # What the actor signed (Group-Auth), kept so that clients can verify every change themselves.
    sa.Column("actor", sa.LargeBinary(32), nullable=False),
    sa.Column("timestamp_ms", sa.BigInteger, nullable=False),
    sa.Column("signature", sa.LargeBinary(64), nullable=False),
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("path", sa.String(256), nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
)

account_block_keys = sa.Table(
    "account_block_keys",
    metadata,
    sa.Column("aci", sa.Uuid, primary_key=True),
    # The account's 32-byte block key, sealed with the at-rest keyring (AES-256-GCM, key id inside).
    sa.Column("sealed_key", sa.LargeBinary, nullable=False),
)

account_blocks = sa.Table(
    "account_blocks",
    metadata,
    sa.Column("aci", sa.Uuid, primary_key=True),
    # HMAC-SHA256(block key, blocked service id string)
    sa.Column("token", sa.LargeBinary(32), primary_key=True),
)

BLOCK_TABLES: tuple[sa.Table, ...] = (account_blocks, account_block_keys)
