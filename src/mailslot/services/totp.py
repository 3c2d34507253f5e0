"""TOTP second factor with single-use numeric backup codes (API.md §1.2).

The registration request carries ``totp`` as a JSON integer, so backup codes are numbers too: ten
digits, never starting with 0 (a leading zero would not survive the integer).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import pyotp

from mailslot.crypto import tokenhash
from mailslot.stores.models import Account

BACKUP_CODE_COUNT = 10
ISSUER = "Mailslot"


@dataclass(slots=True)
class Enrolment:
    secret: str
    uri: str
    backup_codes: list[str]


def new_backup_code() -> str:
    return str(secrets.randbelow(9_000_000_000) + 1_000_000_000)


def _hash_code(code: str) -> str:
    digest, salt = tokenhash.generate(code)
    return f"{digest}|{salt}"


def start_enrolment(account: Account) -> Enrolment:
    """Create a pending secret and fresh backup codes; nothing is enforced until confirmed."""
    secret = pyotp.random_base32()
    codes = [new_backup_code() for _ in range(BACKUP_CODE_COUNT)]
    account.totp_pending_secret = secret
    # Pending codes carry a marker so they count only once enrolment completes; an active
    # enrolment keeps its own codes until then.
    active = [c for c in account.totp_backup_codes if not c.startswith("pending:")]
    account.totp_backup_codes = active + ["pending:" + _hash_code(code) for code in codes]
    uri = pyotp.TOTP(secret).provisioning_uri(name=str(account.aci), issuer_name=ISSUER)
    return Enrolment(secret, uri, codes)


def _totp_ok(secret: str, code: int) -> bool:
    return 0 <= code < 1_000_000 and pyotp.TOTP(secret).verify(f"{code:06d}", valid_window=1)


def confirm_enrolment(account: Account, code: int) -> bool:
    if not account.totp_pending_secret or not _totp_ok(account.totp_pending_secret, code):
        return False
    account.totp_secret = account.totp_pending_secret
    account.totp_pending_secret = None
    account.totp_backup_codes = [c.removeprefix("pending:") for c in account.totp_backup_codes
                                 if c.startswith("pending:")]
    return True


def check_code(account: Account, code: int) -> bool:
    """A current TOTP code, or an unused backup code (which is then consumed from ``account``)."""
    if not account.totp_secret:
        return True
    if _totp_ok(account.totp_secret, code):
        return True
    text = str(code)
    for stored in account.totp_backup_codes:
        if stored.startswith("pending:"):
            continue
        digest, _, salt = stored.partition("|")
        if tokenhash.verify(text, digest, salt):
            account.totp_backup_codes.remove(stored)
            return True
    return False


def current_code_ok(account: Account, code: int) -> bool:
    return bool(account.totp_secret) and _totp_ok(account.totp_secret or "", code)


def remove(account: Account) -> None:
    account.totp_secret = None
    account.totp_pending_secret = None
    account.totp_backup_codes = []
