"""The relational schema, one definition for SQLite and PostgreSQL (SQLAlchemy Core)."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

schema_migrations = sa.Table(
    "schema_migrations",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("applied_at", sa.BigInteger, nullable=False),
)

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("aci", sa.Uuid, primary_key=True),
    sa.Column("number", sa.String(32), unique=True, nullable=True),
    sa.Column("pni", sa.Uuid, nullable=True, unique=True),
    sa.Column("aci_identity_key", sa.LargeBinary, nullable=False),
    sa.Column("pni_identity_key", sa.LargeBinary, nullable=True),
    sa.Column("unidentified_access_key", sa.LargeBinary, nullable=True),
    sa.Column("unrestricted_unidentified_access", sa.Boolean, nullable=False, default=False),
    sa.Column("discoverable_by_phone_number", sa.Boolean, nullable=False, default=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("registration_lock_hash", sa.String(80), nullable=True),
    sa.Column("registration_lock_salt", sa.String(40), nullable=True),
    sa.Column("recovery_password_hash", sa.String(80), nullable=True),
    sa.Column("recovery_password_salt", sa.String(40), nullable=True),
    sa.Column("totp_secret", sa.String(64), nullable=True),
    sa.Column("totp_pending_secret", sa.String(64), nullable=True),
    sa.Column("totp_backup_codes", sa.Text, nullable=False, default="[]"),
)

phone_number_identifiers = sa.Table(
    "phone_number_identifiers",
    metadata,
    sa.Column("number", sa.String(32), primary_key=True),
    sa.Column("pni", sa.Uuid, nullable=False, unique=True),
)

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("aci", sa.Uuid, sa.ForeignKey("accounts.aci", ondelete="CASCADE"), primary_key=True),
    sa.Column("device_id", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("auth_hash", sa.String(80), nullable=False),
    sa.Column("auth_salt", sa.String(40), nullable=False),
    sa.Column("registration_id", sa.Integer, nullable=False),
    sa.Column("pni_registration_id", sa.Integer, nullable=True),
    sa.Column("name", sa.LargeBinary, nullable=True),
    sa.Column("fetches_messages", sa.Boolean, nullable=False),
    sa.Column("capabilities", sa.Text, nullable=False, default="{}"),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("last_seen", sa.BigInteger, nullable=False),
    sa.Column("user_agent", sa.String(16), nullable=True),
    sa.Column("gcm_token", sa.String(4096), nullable=True),
    sa.Column("apn_token", sa.String(4096), nullable=True),
    sa.Column("token_generation", sa.String(32), nullable=False),
)

signed_keys = sa.Table(
    "signed_keys",
    metadata,
    sa.Column("aci", sa.Uuid, primary_key=True),
    sa.Column("device_id", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("identity", sa.String(3), primary_key=True),
    sa.Column("ec_key_id", sa.BigInteger, nullable=False),
    sa.Column("ec_public_key", sa.LargeBinary, nullable=False),
    sa.Column("ec_signature", sa.LargeBinary, nullable=False),
    sa.Column("kem_key_id", sa.BigInteger, nullable=False),
    sa.Column("kem_public_key", sa.LargeBinary, nullable=False),
    sa.Column("kem_signature", sa.LargeBinary, nullable=False),
    sa.ForeignKeyConstraint(["aci"], ["accounts.aci"], ondelete="CASCADE"),
)

verification_sessions = sa.Table(
    "verification_sessions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("number", sa.String(32), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False, index=True),
    sa.Column("verified", sa.Boolean, nullable=False, default=False),
    sa.Column("code_hash", sa.String(80), nullable=True),
    sa.Column("code_expires_at", sa.BigInteger, nullable=True),
    sa.Column("code_attempts", sa.Integer, nullable=False, default=0),
    sa.Column("code_requests", sa.Integer, nullable=False, default=0),
    sa.Column("last_sms_at", sa.BigInteger, nullable=True),
    sa.Column("last_call_at", sa.BigInteger, nullable=True),
    sa.Column("push_token", sa.String(4096), nullable=True),
    sa.Column("push_token_type", sa.String(8), nullable=True),
)

refresh_tokens = sa.Table(
    "refresh_tokens",
    metadata,
    sa.Column("token_id", sa.String(64), primary_key=True),
    sa.Column("family_id", sa.String(64), nullable=False, index=True),
    sa.Column("aci", sa.Uuid, sa.ForeignKey("accounts.aci", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("device_id", sa.SmallInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Column("used", sa.Boolean, nullable=False, default=False),
)

one_time_ec_keys = sa.Table(
    "one_time_ec_keys",
    metadata,
    sa.Column("aci", sa.Uuid, primary_key=True),
    sa.Column("identity", sa.String(3), primary_key=True),
    sa.Column("device_id", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("key_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("public_key", sa.LargeBinary, nullable=False),
    sa.ForeignKeyConstraint(["aci"], ["accounts.aci"], ondelete="CASCADE"),
)

one_time_kem_keys = sa.Table(
    "one_time_kem_keys",
    metadata,
    sa.Column("aci", sa.Uuid, primary_key=True),
    sa.Column("identity", sa.String(3), primary_key=True),
    sa.Column("device_id", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("key_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("public_key", sa.LargeBinary, nullable=False),
    sa.Column("signature", sa.LargeBinary, nullable=False),
    sa.ForeignKeyConstraint(["aci"], ["accounts.aci"], ondelete="CASCADE"),
)

messages = sa.Table(
    "messages",
    metadata,
    # The per-device queue. ``id`` orders a device's queue; ``envelope`` is the serialized Envelope,
    # sealed at rest (AES-256-GCM, key id inside). For multi-recipient sends ``envelope`` holds the
    # envelope without its content and ``shared_id`` names the payload stored once in shared_payloads;
    # ``recipient_part`` (c ‖ at, 48 bytes) is this device's slice of it.
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("aci", sa.Uuid, nullable=False),
    sa.Column("device_id", sa.SmallInteger, nullable=False),
    sa.Column("guid", sa.Uuid, nullable=False, unique=True),
    sa.Column("envelope", sa.LargeBinary, nullable=False),
    sa.Column("shared_id", sa.Uuid, nullable=True),
    sa.Column("recipient_part", sa.LargeBinary, nullable=True),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Index("messages_queue", "aci", "device_id", "id"),
    sa.Index("messages_expiry", "expires_at"),
    # Ids are never reused (SQLite would otherwise hand the id of a deleted last row to the next insert),
    # so a queue's order is the order of its ids.
    sqlite_autoincrement=True,
)

shared_payloads = sa.Table(
    "shared_payloads",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False, index=True),
)

used_link_tokens = sa.Table(
    "used_link_tokens",
    metadata,
    # SHA-256 of a device-link token that has been used (tokens are single use until they expire).
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("expires_at", sa.BigInteger, nullable=False, index=True),
)

account_directory = sa.Table(
    "account_directory",
    metadata,
    # Sharded storage only: lookups not keyed by the account id. ``lookup_key`` is ``number:<e164>`` or
    # ``pni:<uuid>``; the row lives on the shard of that key and names the account, which lives on the
    # shard of its ``aci``. A row whose account no longer has that number or PNI is stale and ignored.
    sa.Column("lookup_key", sa.String(80), primary_key=True),
    sa.Column("aci", sa.Uuid, nullable=False),
)

# Tables holding rows keyed by an account, in delete order (children first).
ACCOUNT_TABLES: tuple[sa.Table, ...] = (
    messages,
    refresh_tokens,
    one_time_ec_keys,
    one_time_kem_keys,
    signed_keys,
    devices,
    accounts,
)

# Tables whose rows belong to one device (removed with it): all have ``aci`` and ``device_id``.
DEVICE_TABLES: tuple[sa.Table, ...] = (
    messages,
    refresh_tokens,
    one_time_ec_keys,
    one_time_kem_keys,
    signed_keys,
    devices,
)

# Profiles (digest §8), migration 6. Every byte column is client-side ciphertext.
profile_versions = sa.Table(
    "profile_versions",
    metadata,
    sa.Column("aci", sa.Uuid, primary_key=True),
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("commitment", sa.LargeBinary, nullable=False),
    sa.Column("name", sa.LargeBinary, nullable=True),
    sa.Column("about", sa.LargeBinary, nullable=True),
    sa.Column("about_emoji", sa.LargeBinary, nullable=True),
    sa.Column("payment_address", sa.LargeBinary, nullable=True),
    sa.Column("phone_number_sharing", sa.LargeBinary, nullable=True),
    sa.Column("avatar", sa.String(80), nullable=True, index=True),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
)

profile_current = sa.Table(
    "profile_current",
    metadata,
    # The account's current profile version and its visible badges (JSON list of ids, in order).
    sa.Column("aci", sa.Uuid, primary_key=True),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("badge_ids", sa.Text, nullable=False, default="[]"),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
)
