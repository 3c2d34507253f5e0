"""Configuration: a TOML file, overridden by ``MAILSLOT_<SECTION>__<KEY>`` environment variables.

The section and key names are part of the operator contract (see the README and API.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    trusted_proxies: list[str] = Field(default_factory=list)
    max_body_bytes: int = 2 * 1024 * 1024


class TlsSettings(BaseModel):
    cert_file: str = ""
    key_file: str = ""
    hsts_max_age: int = 31536000

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file and self.key_file)


class StorageSettings(BaseModel):
    url: str = "sqlite:///var/mailslot.db"
    urls: list[str] = Field(default_factory=list)
    data_dir: str = "var"
    # PostgreSQL schema (search_path) to use; empty means the server default. Tests use it to isolate runs.
    schema_name: str = Field(default="", alias="schema")
    pool_size: int = 20
    # Accounts are read on every request; this long a read may be served from memory. Writes by this
    # process are seen at once, writes by other nodes after at most this long. 0 turns the cache off.
    account_cache_seconds: float = 1.0

    model_config = {"populate_by_name": True}


class ClusterSettings(BaseModel):
    # Empty: one process, in-process bus. Set: presence, the bus and rate limits go through Redis.
    redis_url: str = ""
    # Prefix of every Redis key and channel, so that several clusters (or test runs) can share a Redis.
    key_prefix: str = "mailslot"
    # How this node names itself in Redis; empty means host name, process id and a random suffix.
    node_id: str = ""
    # Every connected device's queue is re-read this often, so that a wake-up lost while Redis was
    # away is made up for even if nothing else arrives. 0 turns the sweep off.
    sweep_seconds: float = 30.0


class ServerKeySettings(BaseModel):
    id: int
    certificate: str
    private_key: str


class SealedSenderSettings(BaseModel):
    trust_root: str = ""
    server_keys: list[ServerKeySettings] = Field(default_factory=list)
    certificate_days: int = 7


class RateLimitSettings(BaseModel):
    capacity: float
    permit_seconds: float


class TwilioSettings(BaseModel):
    account_sid: str = ""
    auth_token: str = ""
    from_number: str = ""
    base_url: str = "https://api.twilio.com"


class RegistrationSettings(BaseModel):
    sms_provider: Literal["console", "webhook", "twilio"] = "console"
    test_numbers: dict[str, str] = Field(default_factory=dict)
    webhook_url: str = ""
    webhook_secret: str = ""
    twilio: TwilioSettings = Field(default_factory=TwilioSettings)
    code_ttl_seconds: int = 600
    max_code_attempts: int = 5
    session_ttl_seconds: int = 3600
    sms_resend_seconds: int = 60
    call_resend_seconds: int = 60
    max_code_requests: int = 5


class AuthSettings(BaseModel):
    # Secret for signing session JWTs; empty means generated once and kept in data_dir.
    jwt_secret: str = ""
    # HMAC key of device-link tokens; every node of a cluster needs the same. Empty: generated into data_dir.
    link_secret: str = ""
    access_token_seconds: int = 3600
    refresh_token_seconds: int = 30 * 24 * 3600


class WebSocketSettings(BaseModel):
    max_frame_bytes: int = 512 * 1024
    idle_timeout_seconds: float = 90.0


class DeliverySettings(BaseModel):
    message_ttl_days: float = 30.0
    max_in_flight: int = 256
    max_message_bytes: int = 96 * 1024
    # At-rest encryption keys for queued envelopes: {id = "base64 32 bytes"}. Empty: one key is
    # generated into data_dir on first start. The highest id (or ``at_rest_current``) encrypts; older
    # ids still decrypt, so a key can be rotated by adding a new one.
    at_rest_keys: dict[int, str] = Field(default_factory=dict)
    at_rest_current: int = 0


class GroupSettings(BaseModel):
    # Members plus pending invitations a group may hold (GROUPS.md).
    max_members: int = Field(default=1000, ge=1, le=100_000)


class LoggingSettings(BaseModel):
    level: str = "INFO"
    access_log: bool = True


class MediaSettings(BaseModel):
    """``[media]``: where attachments and avatars live, their limits and how long they are kept."""

    backend: Literal["local", "s3"] = "local"
    # local: the directory of the blob store; empty means ``<data_dir>/blobs``.
    directory: str = ""
    # s3: any S3-compatible store. Credentials empty: boto3's usual chain (environment, profile, role).
    s3_endpoint: str = ""
    s3_bucket: str = ""
    s3_region: str = "us-east-1"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_part_bytes: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)
    # Base URL of the tus endpoint in upload forms; empty: ``[server] public_url``, else the request's own.
    upload_url: str = ""
    max_attachment_bytes: int = Field(default=100 * 1024 * 1024, ge=1)
    # HS256 secret of upload tokens (never the session secret); empty: generated into data_dir.
    upload_secret: str = ""
    upload_token_seconds: int = Field(default=86400, ge=60)
    upload_expiry_seconds: int = Field(default=86400, ge=60)  # unfinished uploads are dropped after this
    attachment_expiry_days: float = Field(default=30.0, gt=0)
    avatar_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    avatar_form_seconds: int = Field(default=1800, ge=60)
    # Signing key of avatar POST policies on the built-in store (the S3 backend signs with its own);
    # empty: generated into data_dir.
    avatar_access_key: str = "mailslot"
    avatar_secret_key: str = ""


class Settings(BaseSettings):
    server: ServerSettings = Field(default_factory=ServerSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    sealed_sender: SealedSenderSettings = Field(default_factory=SealedSenderSettings)
    rate_limits: dict[str, RateLimitSettings] = Field(default_factory=dict)
    registration: RegistrationSettings = Field(default_factory=RegistrationSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    websocket: WebSocketSettings = Field(default_factory=WebSocketSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    groups: GroupSettings = Field(default_factory=GroupSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    media: MediaSettings = Field(default_factory=MediaSettings)

    model_config = SettingsConfigDict(
        env_prefix="MAILSLOT_", env_nested_delimiter="__", extra="ignore", case_sensitive=False
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_toml_path))
        return tuple(sources)


_toml_path: Path | None = None


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (TOML) and the environment; keyword overrides win over both."""
    global _toml_path
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    _toml_path = Path(path) if path is not None else None
    try:
        return Settings(**overrides)
    finally:
        _toml_path = None
