"""XEdDSA signatures, checked against vectors produced and judged by libsignal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from mailslot.crypto import keys, xeddsa

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parent.parent / "data" / "xeddsa_libsignal_vectors.json").read_text()
)
L = 2**252 + 27742317777372353535851937790883648493
P = 2**255 - 19


def _ids(cases: list[dict[str, Any]]) -> list[str]:
    return [f"{i}-{case.get('note', case.get('kind'))}" for i, case in enumerate(cases)]


def _b(case: dict[str, Any], field: str) -> bytes:
    return bytes.fromhex(case[field])


# ---------------------------------------------------------------- libsignal vectors


@pytest.mark.parametrize("vector", VECTORS["signatures"], ids=_ids(VECTORS["signatures"]))
def test_libsignal_signature_verifies(vector: dict[str, Any]) -> None:
    public, message, signature = _b(vector, "public_key"), _b(vector, "message"), _b(vector, "signature")
    assert xeddsa.public_key_from_private(_b(vector, "private_key")) == public
    assert signature[63] >> 7 == vector["sign_bit"]
    assert xeddsa.verify(public, message, signature)
    assert not xeddsa.verify(public, message + b"\x00", signature)


def test_libsignal_vectors_cover_both_sign_bits() -> None:
    assert {v["sign_bit"] for v in VECTORS["signatures"]} == {0, 1}
    kinds = {v["kind"] for v in VECTORS["signatures"]}
    assert {"ec_prekey", "kem_prekey"} <= kinds


@pytest.mark.parametrize("case", VECTORS["verify_cases"], ids=_ids(VECTORS["verify_cases"]))
def test_verify_agrees_with_libsignal(case: dict[str, Any]) -> None:
    result = xeddsa.verify(_b(case, "public_key"), _b(case, "message"), _b(case, "signature"))
    assert result is case["libsignal_verifies"]


@pytest.mark.parametrize(
    "case",
    [c for c in VECTORS["verify_cases"] if "random" in c],
    ids=_ids([c for c in VECTORS["verify_cases"] if "random" in c]),
)
def test_sign_is_reproducible_and_accepted_by_libsignal(case: dict[str, Any]) -> None:
    # These signatures were made by sign() and accepted by libsignal's verify().
    signature = xeddsa.sign(_b(case, "private_key"), _b(case, "message"), _b(case, "random"))
    assert signature == _b(case, "signature")
    assert case["libsignal_verifies"] is True


# ------------------------------------------------------------------- round trips


@settings(max_examples=50)
@given(message=st.binary(max_size=2048))
def test_sign_verify_round_trip(message: bytes) -> None:
    private, public = xeddsa.generate_keypair()
    signature = xeddsa.sign(private, message)
    assert len(signature) == 64
    assert xeddsa.verify(public, message, signature)


@settings(max_examples=100)
@given(data=st.data())
def test_any_bit_flip_in_signature_fails(data: st.DataObject) -> None:
    private, public = xeddsa.generate_keypair()
    message = data.draw(st.binary(min_size=1, max_size=64))
    signature = bytearray(xeddsa.sign(private, message))
    index = data.draw(st.integers(0, 63))
    bit = data.draw(st.integers(0, 7))
    signature[index] ^= 1 << bit
    assert not xeddsa.verify(public, message, bytes(signature))


@settings(max_examples=50)
@given(data=st.data())
def test_bit_flip_in_message_or_key_fails(data: st.DataObject) -> None:
    private, public = xeddsa.generate_keypair()
    message = data.draw(st.binary(min_size=1, max_size=64))
    signature = xeddsa.sign(private, message)

    flipped_message = bytearray(message)
    flipped_message[data.draw(st.integers(0, len(message) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    assert not xeddsa.verify(public, bytes(flipped_message), signature)

    # Bit 255 of u (top bit of the last key byte) is ignored, as by libsignal; any other flip fails.
    position = data.draw(st.integers(0, 254))
    flipped_key = bytearray(public)
    flipped_key[1 + position // 8] ^= 1 << (position % 8)
    assert not xeddsa.verify(bytes(flipped_key), message, signature)


def test_top_bit_of_u_is_ignored() -> None:
    private, public = xeddsa.generate_keypair()
    signature = xeddsa.sign(private, b"m")
    assert xeddsa.verify(public[:32] + bytes([public[32] | 0x80]), b"m", signature)


# ------------------------------------------------------------------- sign bit


def test_sign_bit_carries_edwards_sign() -> None:
    seen: set[int] = set()
    for _ in range(64):
        private, public = xeddsa.generate_keypair()
        signature = xeddsa.sign(private, b"sign bit")
        bit = signature[63] >> 7
        seen.add(bit)
        toggled = signature[:63] + bytes([signature[63] ^ 0x80])
        assert xeddsa.verify(public, b"sign bit", signature)
        assert not xeddsa.verify(public, b"sign bit", toggled)
        if len(seen) == 2:
            break
    assert seen == {0, 1}


def test_non_canonical_s_below_2_253_is_accepted_like_libsignal() -> None:
    private, public = xeddsa.generate_keypair()
    signature = xeddsa.sign(private, b"malleable")
    sign_bit = signature[63] & 0x80
    s = int.from_bytes(signature[32:], "little") & ((1 << 255) - 1)
    high = bytearray((s + L).to_bytes(32, "little"))
    high[31] |= sign_bit
    assert xeddsa.verify(public, b"malleable", signature[:32] + bytes(high))
    too_high = bytearray((s + 2**253).to_bytes(32, "little"))
    too_high[31] |= sign_bit
    assert not xeddsa.verify(public, b"malleable", signature[:32] + bytes(too_high))


# --------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("key", "signature"),
    [
        (b"\x05" + bytes(31), bytes(64)),
        (b"\x05" + bytes(33), bytes(64)),
        (b"\x06" + bytes(32), bytes(64)),
        (b"", bytes(64)),
        (b"\x05" + bytes(32), bytes(63)),
        (b"\x05" + bytes(32), bytes(65)),
        (b"\x05" + bytes(32), b""),
        (b"\x05" + (P - 1).to_bytes(32, "little"), bytes(64)),
    ],
)
def test_malformed_input_is_rejected(key: bytes, signature: bytes) -> None:
    assert xeddsa.verify(key, b"message", signature) is False


def test_wrong_types_return_false() -> None:
    private, public = xeddsa.generate_keypair()
    signature = xeddsa.sign(private, b"m")
    assert xeddsa.verify(public.hex(), b"m", signature) is False  # type: ignore[arg-type]
    assert xeddsa.verify(public, "m", signature) is False  # type: ignore[arg-type]
    assert xeddsa.verify(public, b"m", None) is False  # type: ignore[arg-type]
    bytes_like: Any = (bytearray(public), memoryview(b"m"), bytearray(signature))
    assert xeddsa.verify(*bytes_like) is True


@given(key=st.binary(max_size=40), message=st.binary(max_size=40), signature=st.binary(max_size=70))
def test_verify_never_raises(key: bytes, message: bytes, signature: bytes) -> None:
    assert xeddsa.verify(key, message, signature) in (True, False)
    assert xeddsa.verify(b"\x05" + key[:32].ljust(32, b"\0"), message, signature.ljust(64, b"\0")[:64]) in (
        True,
        False,
    )


def test_sign_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError):
        xeddsa.sign(bytes(31), b"m")
    with pytest.raises(ValueError):
        xeddsa.sign(bytes(32), b"m", random=bytes(32))
    with pytest.raises(ValueError):
        xeddsa.public_key_from_private(bytes(33))


def test_sign_with_fixed_random_is_deterministic() -> None:
    private, public = xeddsa.generate_keypair()
    first = xeddsa.sign(private, b"m", random=bytes(64))
    assert first == xeddsa.sign(private, b"m", random=bytes(64))
    assert first != xeddsa.sign(private, b"m", random=b"\x01" * 64)
    assert xeddsa.verify(public, b"m", first)


# ------------------------------------------------------------------------ keys


def test_generate_keypair_shapes_and_clamping() -> None:
    private, public = xeddsa.generate_keypair()
    assert len(private) == 32
    assert private[0] & 7 == 0 and private[31] & 0x80 == 0 and private[31] & 0x40
    assert keys.is_valid_ec_public_key(public)
    assert xeddsa.public_key_from_private(private) == public


def test_keypair_agrees_with_x25519() -> None:
    a_private, a_public = xeddsa.generate_keypair()
    b_private, b_public = xeddsa.generate_keypair()
    shared_a = X25519PrivateKey.from_private_bytes(a_private).exchange(
        X25519PublicKey.from_public_bytes(b_public[1:])
    )
    shared_b = X25519PrivateKey.from_private_bytes(b_private).exchange(
        X25519PublicKey.from_public_bytes(a_public[1:])
    )
    assert shared_a == shared_b


def test_unclamped_private_key_signs_for_its_public_key() -> None:
    private = bytes(range(32))
    public = xeddsa.public_key_from_private(private)
    assert xeddsa.verify(public, b"m", xeddsa.sign(private, b"m"))


def test_key_format_validators() -> None:
    assert keys.is_valid_ec_public_key(b"\x05" + bytes(32))
    assert not keys.is_valid_ec_public_key(b"\x05" + bytes(31))
    assert not keys.is_valid_ec_public_key(b"\x08" + bytes(32))
    assert not keys.is_valid_ec_public_key("\x05" + "a" * 32)  # type: ignore[arg-type]
    assert keys.is_valid_kem_public_key(b"\x08" + bytes(1568))
    assert keys.is_valid_kem_public_key(b"\x0a" + bytes(1568))
    assert not keys.is_valid_kem_public_key(b"\x07" + bytes(1568))
    assert not keys.is_valid_kem_public_key(b"\x08" + bytes(1567))
    assert not keys.is_valid_kem_public_key(b"")
    assert keys.is_valid_signature(bytes(64))
    assert not keys.is_valid_signature(bytes(65))
    kem = next(v for v in VECTORS["signatures"] if v["kind"] == "kem_prekey")
    assert keys.is_valid_kem_public_key(_b(kem, "message"))
