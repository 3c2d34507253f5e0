"""At-rest envelope encryption: round trips, rotation, tampering and key configuration."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from mailslot.crypto.atrest import (
    OVERHEAD,
    AtRestError,
    AtRestKeyring,
    InvalidKeyConfig,
    SealedDataCorrupt,
    UnknownKeyId,
    keyring_from_config,
)

K1, K2, K3 = (bytes([n]) * 32 for n in (1, 2, 3))
AD = b"account-uuid-16b" + b"\x01" + b"guid-guid-guid-g"


@pytest.fixture
def ring() -> AtRestKeyring:
    return AtRestKeyring({1: K1, 2: K2}, current=2)


def test_round_trip(ring: AtRestKeyring) -> None:
    for plaintext in (b"", b"x", os.urandom(1000)):
        sealed = ring.seal(plaintext, AD)
        assert len(sealed) == len(plaintext) + OVERHEAD
        assert ring.open(sealed, AD) == plaintext


def test_layout_is_key_id_nonce_ciphertext_tag(ring: AtRestKeyring) -> None:
    sealed = ring.seal(b"hello", AD)
    assert sealed[:2] == b"\x00\x02"
    nonce, body = sealed[2:14], sealed[14:]
    assert AESGCM(K2).decrypt(nonce, body, b"\x00\x02" + AD) == b"hello"
    assert AtRestKeyring.key_id_of(sealed) == 2


def test_nonces_are_fresh(ring: AtRestKeyring) -> None:
    seals = {ring.seal(b"same", AD) for _ in range(50)}
    assert len(seals) == 50
    assert len({s[2:14] for s in seals}) == 50


# ---------------------------------------------------------------- rotation


def test_rotation_old_ids_still_open_new_seals_use_current() -> None:
    old = AtRestKeyring({1: K1}, current=1)
    sealed_old = old.seal(b"before rotation", AD)

    rotated = AtRestKeyring({1: K1, 2: K2}, current=2)
    assert rotated.open(sealed_old, AD) == b"before rotation"
    sealed_new = rotated.seal(b"after rotation", AD)
    assert AtRestKeyring.key_id_of(sealed_new) == 2
    assert rotated.needs_reseal(sealed_old) and not rotated.needs_reseal(sealed_new)

    with pytest.raises(UnknownKeyId) as info:
        old.open(sealed_new, AD)
    assert info.value.key_id == 2


def test_reseal_moves_to_current_key() -> None:
    sealed_old = AtRestKeyring({1: K1}, current=1).seal(b"payload", AD)
    rotated = AtRestKeyring({1: K1, 2: K2}, current=2)
    moved = rotated.reseal(sealed_old, AD)
    assert AtRestKeyring.key_id_of(moved) == 2
    assert AtRestKeyring({2: K2}, current=2).open(moved, AD) == b"payload"
    assert rotated.reseal(moved, AD) is moved
    with pytest.raises(SealedDataCorrupt):
        rotated.reseal(sealed_old, AD + b"x")


def test_current_can_be_an_older_id() -> None:
    ring = AtRestKeyring({1: K1, 2: K2}, current=1)
    assert AtRestKeyring.key_id_of(ring.seal(b"x", AD)) == 1


def test_large_key_ids_round_trip() -> None:
    ring = AtRestKeyring({0: K1, 0xFFFF: K2}, current=0xFFFF)
    sealed = ring.seal(b"x", AD)
    assert sealed[:2] == b"\xff\xff"
    assert ring.open(sealed, AD) == b"x"
    assert AtRestKeyring({0: K1}, current=0).open(AtRestKeyring({0: K1}, current=0).seal(b"y", AD), AD) == b"y"


# ---------------------------------------------------------------- tampering and binding


def test_every_single_bit_flip_is_detected(ring: AtRestKeyring) -> None:
    sealed = ring.seal(b"envelope bytes", AD)
    for index in range(len(sealed)):
        for bit in range(8):
            tampered = bytearray(sealed)
            tampered[index] ^= 1 << bit
            # A flip in the key id either names an unknown key or the other key: both must fail.
            with pytest.raises((SealedDataCorrupt, UnknownKeyId)):
                ring.open(bytes(tampered), AD)


def test_relabelled_key_id_fails(ring: AtRestKeyring) -> None:
    sealed = ring.seal(b"x", AD)
    with pytest.raises(SealedDataCorrupt):
        ring.open(b"\x00\x01" + sealed[2:], AD)


def test_truncation_and_extension_are_detected(ring: AtRestKeyring) -> None:
    sealed = ring.seal(b"some plaintext", AD)
    for end in range(len(sealed)):
        with pytest.raises(SealedDataCorrupt):
            ring.open(sealed[:end], AD)
    with pytest.raises(SealedDataCorrupt):
        ring.open(sealed + b"\x00", AD)


def test_wrong_associated_data_fails(ring: AtRestKeyring) -> None:
    sealed = ring.seal(b"for row A", b"row-A")
    for other in (b"row-B", b"", b"row-A\x00", b"row-"):
        with pytest.raises(SealedDataCorrupt, match="associated data"):
            ring.open(sealed, other)


def test_rows_cannot_be_swapped(ring: AtRestKeyring) -> None:
    row_a = b"acct-a" + b"\x01" + b"guid-a"
    row_b = b"acct-a" + b"\x02" + b"guid-b"
    sealed_a, sealed_b = ring.seal(b"message A", row_a), ring.seal(b"message B", row_b)
    with pytest.raises(SealedDataCorrupt):
        ring.open(sealed_a, row_b)
    with pytest.raises(SealedDataCorrupt):
        ring.open(sealed_b, row_a)


def test_wrong_key_with_same_id_fails() -> None:
    sealed = AtRestKeyring({1: K1}, current=1).seal(b"x", AD)
    with pytest.raises(SealedDataCorrupt):
        AtRestKeyring({1: K3}, current=1).open(sealed, AD)


def test_unknown_key_id(ring: AtRestKeyring) -> None:
    sealed = AtRestKeyring({9: K3}, current=9).seal(b"x", AD)
    with pytest.raises(UnknownKeyId, match="no at-rest key with id 9"):
        ring.open(sealed, AD)


def test_key_id_of_needs_two_bytes() -> None:
    with pytest.raises(SealedDataCorrupt):
        AtRestKeyring.key_id_of(b"\x01")


def test_errors_are_value_errors() -> None:
    for cls in (UnknownKeyId, SealedDataCorrupt, InvalidKeyConfig):
        assert issubclass(cls, AtRestError) and issubclass(cls, ValueError)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=64), st.binary(max_size=64))
def test_round_trip_property(plaintext: bytes, ad: bytes, other_ad: bytes) -> None:
    ring = AtRestKeyring({7: K1}, current=7)
    sealed = ring.seal(plaintext, ad)
    assert ring.open(sealed, ad) == plaintext
    if other_ad != ad:
        with pytest.raises(SealedDataCorrupt):
            ring.open(sealed, other_ad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_random_input_only_raises_at_rest_errors(garbage: bytes) -> None:
    ring = AtRestKeyring({0: K1, 1: K2, 258: K3}, current=1)
    with pytest.raises(AtRestError):
        ring.open(garbage, AD)


# ---------------------------------------------------------------- keyring construction


@pytest.mark.parametrize(
    ("keys", "current", "match"),
    [
        ({}, 1, "at least one key"),
        ({1: K1}, 2, "current key id 2 is not in the keyring"),
        ({1: b"short"}, 1, "key 1: must be 32 bytes, got 5"),
        ({1: K1 + b"x"}, 1, "got 33"),
        ({-1: K1}, -1, "key id must be"),
        ({65536: K1}, 65536, "key id must be"),
        ({1: "not bytes"}, 1, "must be 32 bytes"),
    ],
)
def test_keyring_rejects_bad_keys(keys: dict[Any, Any], current: int, match: str) -> None:
    with pytest.raises(InvalidKeyConfig, match=match):
        AtRestKeyring(keys, current)


def test_repr_hides_key_material(ring: AtRestKeyring) -> None:
    text = repr(ring)
    assert "key_ids=[1, 2]" in text and "current=2" in text
    assert K1.hex() not in text and str(K1) not in text
    assert ring.key_ids == frozenset({1, 2})


# ---------------------------------------------------------------- keyring_from_config


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def test_config_mapping_defaults_current_to_highest_id() -> None:
    ring = keyring_from_config({1: b64(K1), 5: b64(K2), 3: b64(K3)})
    assert ring.current == 5 and ring.key_ids == frozenset({1, 3, 5})
    sealed = AtRestKeyring({3: K3}, current=3).seal(b"x", AD)
    assert ring.open(sealed, AD) == b"x"


def test_config_list_of_id_key_entries() -> None:
    ring = keyring_from_config([f"1:{b64(K1)}", f" 2 : {b64(K2)} "], current=1)
    assert ring.current == 1
    assert AtRestKeyring({1: K1}, current=1).open(ring.seal(b"y", AD), AD) == b"y"
    assert ring.open(AtRestKeyring({2: K2}, current=2).seal(b"w", AD), AD) == b"w"


def test_config_accepts_urlsafe_and_unpadded_base64() -> None:
    key = bytes(range(224, 256))  # encodes with '+', '/' in standard base64
    standard = b64(key)
    assert "+" in standard or "/" in standard
    urlsafe = base64.urlsafe_b64encode(key).decode().rstrip("=")
    for text in (standard, urlsafe):
        ring = keyring_from_config({4: text})
        assert AtRestKeyring({4: key}, current=4).open(ring.seal(b"z", AD), AD) == b"z"


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ({1: b64(b"x" * 16)}, "key 1: must decode to 32 bytes, got 16"),
        ({1: b64(b"x" * 64)}, "got 64"),
        ({1: ""}, "got 0"),
        ({1: "not base64 at all!"}, "key 1: not valid base64"),
        ({1: b64(K1)[:-2] + "*="}, "not valid base64"),
        ([f"{b64(K1)}"], "ID:BASE64"),
        ([f"x:{b64(K1)}"], "decimal id"),
        ([f"-1:{b64(K1)}"], "decimal id"),
        ([f"70000:{b64(K1)}"], "key id must be"),
        ([f"1:{b64(K1)}", f"01:{b64(K2)}"], "configured twice"),
        ([], "no at-rest keys"),
        ({}, "no at-rest keys"),
        (b64(K1), "single string"),
    ],
)
def test_config_rejects(entries: Any, match: str) -> None:
    with pytest.raises(InvalidKeyConfig, match=match):
        keyring_from_config(entries)


def test_config_errors_never_echo_key_material() -> None:
    secret = b64(b"S" * 31)
    with pytest.raises(InvalidKeyConfig) as info:
        keyring_from_config({1: secret})
    assert secret not in str(info.value)


def test_config_current_must_exist() -> None:
    with pytest.raises(InvalidKeyConfig, match="current key id 9"):
        keyring_from_config({1: b64(K1)}, current=9)
