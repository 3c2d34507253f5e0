"""Salted token hashes in Signal-Server's SaltedTokenHash format (reference §2.2)."""

from __future__ import annotations

import hashlib
import hmac
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mailslot.crypto import tokenhash


def _reference_hash(token: str, salt: str) -> str:
    """RFC 5869 HKDF-SHA256 written out by hand, as an independent check of the construction."""
    prk = hmac.new(salt.encode(), token.encode(), hashlib.sha256).digest()
    okm = hmac.new(prk, b"authtoken" + b"\x01", hashlib.sha256).digest()
    return "2." + okm.hex()


def test_generate_format() -> None:
    stored_hash, salt = tokenhash.generate("correct horse battery staple")
    assert re.fullmatch(r"[0-9a-f]{32}", salt)
    assert re.fullmatch(r"2\.[0-9a-f]{64}", stored_hash)


def test_generate_uses_fresh_salt() -> None:
    first = tokenhash.generate("same")
    second = tokenhash.generate("same")
    assert first[1] != second[1]
    assert first[0] != second[0]


def test_matches_hkdf_construction() -> None:
    salt = "00112233445566778899aabbccddeeff"
    assert tokenhash._derive("password", salt) == _reference_hash("password", salt)
    stored_hash, salt = tokenhash.generate("p4ssw0rd")
    assert stored_hash == _reference_hash("p4ssw0rd", salt)


def test_known_vector() -> None:
    # Pinned so that a change of construction (and so of every stored credential) is noticed.
    salt = "0123456789abcdef0123456789abcdef"
    expected = _reference_hash("hunter2", salt)
    assert tokenhash.verify("hunter2", expected, salt)
    assert expected == tokenhash._derive("hunter2", salt)


def test_verify_round_trip_and_wrong_token() -> None:
    stored_hash, salt = tokenhash.generate("secret")
    assert tokenhash.verify("secret", stored_hash, salt)
    assert not tokenhash.verify("Secret", stored_hash, salt)
    assert not tokenhash.verify("", stored_hash, salt)
    assert not tokenhash.verify("secret", stored_hash, "0" * 32)


def test_locked_hash_never_matches() -> None:
    stored_hash, salt = tokenhash.generate("secret")
    assert not tokenhash.verify("secret", "!" + stored_hash, salt)
    assert not tokenhash.verify("secret", "!", salt)


def test_legacy_and_malformed_hashes_never_match() -> None:
    salt = "0123456789abcdef0123456789abcdef"
    v1 = hashlib.sha256((salt + "secret").encode()).hexdigest()  # Signal's old V1 form
    assert not tokenhash.verify("secret", v1, salt)
    assert not tokenhash.verify("secret", "", salt)
    assert not tokenhash.verify("secret", "2.", salt)


def test_unencodable_token_does_not_raise() -> None:
    stored_hash, salt = tokenhash.generate("x")
    assert not tokenhash.verify("\ud800", stored_hash, salt)


@settings(max_examples=50)
@given(token=st.text(max_size=64), other=st.text(max_size=64))
def test_round_trip_any_text(token: str, other: str) -> None:
    stored_hash, salt = tokenhash.generate(token)
    assert tokenhash.verify(token, stored_hash, salt)
    assert tokenhash.verify(other, stored_hash, salt) == (other == token)
