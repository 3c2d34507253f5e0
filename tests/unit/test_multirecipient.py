"""Sealed-sender v2 multi-recipient parsing, checked against payloads made and judged by libsignal."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailslot.crypto import multirecipient as mr
from mailslot.crypto.multirecipient import MalformedMultiRecipientMessage, MultiRecipientMessage, parse

DATA: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parent.parent / "data" / "ssv2_libsignal_vectors.json").read_text()
)
VECTORS: list[dict[str, Any]] = DATA["vectors"]
CASES: list[dict[str, Any]] = DATA["parse_cases"]

EPUB = bytes(range(32))
CT = b"shared ciphertext"


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


def _ids(items: list[dict[str, Any]]) -> list[str]:
    return [f"{i}-{item['note'][:60]}" for i, item in enumerate(items)]


# ---------------------------------------------------------------- builders


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def uid(tag: int) -> bytes:
    return tag.to_bytes(4, "big") + bytes(range(12))


def devices(pairs: list[tuple[int, int]], *, more_last: bool = False) -> bytes:
    out = bytearray()
    for i, (device_id, reg_id) in enumerate(pairs):
        more = i < len(pairs) - 1 or more_last
        out += bytes([device_id]) + (reg_id | (0x8000 if more else 0)).to_bytes(2, "big")
    return bytes(out)


def c_of(tag: int) -> bytes:
    return bytes([tag & 0xFF]) * 32


def at_of(tag: int) -> bytes:
    return bytes([~tag & 0xFF]) * 16


Entry = tuple[int, int, "list[tuple[int, int]] | None"]  # (kind, uuid tag, devices or None = excluded)


def build(version: int, entries: list[Entry], *, count: int | None = None, tail: bytes = EPUB + CT) -> bytes:
    out = bytearray([version]) + varint(len(entries) if count is None else count)
    for kind, tag, devs in entries:
        if version == 0x23:
            out.append(kind)
        out += uid(tag)
        if devs is None:
            out.append(0)
        else:
            out += devices(devs) + c_of(tag) + at_of(tag)
    return bytes(out + tail)


def key(kind: int, tag: int) -> bytes:
    return bytes([kind]) + uid(tag)


def malformed(data: bytes, match: str) -> None:
    with pytest.raises(MalformedMultiRecipientMessage, match=match):
        parse(data)


# ---------------------------------------------------------------- hand-built payloads


def test_v22_recipients_are_acis() -> None:
    msg = parse(build(0x22, [(0, 0xA1, [(1, 11), (2, 16383)]), (0, 0xB2, [(127, 0)])]))
    assert msg.version == 0x22
    assert list(msg.recipients) == [key(0, 0xA1), key(0, 0xB2)]
    a, b = msg.recipients.values()
    assert a.service_id_bytes == key(0, 0xA1) and len(a.service_id_bytes) == 17
    assert not a.is_pni and not a.excluded
    assert a.devices == [(1, 11), (2, 16383)]
    assert a.device_ids == [1, 2]
    assert (a.c, a.at) == (c_of(0xA1), at_of(0xA1))
    assert b.devices == [(127, 0)]
    assert a.uuid == uuid.UUID(bytes=uid(0xA1))
    assert a.service_id_string == str(uuid.UUID(bytes=uid(0xA1)))
    assert msg.e_pub == EPUB
    assert bytes(msg.ciphertext) == CT


def test_v23_aci_and_pni() -> None:
    data = build(0x23, [(0, 0xA1, [(1, 5)]), (1, 0xB2, [(2, 6), (3, 7)])])
    msg = parse(data)
    assert msg.version == 0x23
    aci, pni = msg.recipients.values()
    assert not aci.is_pni and pni.is_pni
    assert pni.service_id_bytes == key(1, 0xB2)
    assert pni.service_id_string == "PNI:" + str(uuid.UUID(bytes=uid(0xB2)))
    assert pni.devices == [(2, 6), (3, 7)]


def test_same_uuid_as_aci_and_pni_are_different_recipients() -> None:
    msg = parse(build(0x23, [(0, 0xA1, [(1, 1)]), (1, 0xA1, [(1, 1)])]))
    assert list(msg.recipients) == [key(0, 0xA1), key(1, 0xA1)]


def test_offsets_and_parts() -> None:
    data = build(0x23, [(0, 0xA1, [(1, 1)]), (0, 0xB2, [(2, 2), (3, 3)])])
    msg = parse(data)
    a, b = msg.recipients.values()
    assert a.key_material_offset == 1 + 1 + 17 + 3
    assert data[a.key_material_offset : a.key_material_offset + 48] == a.c + a.at
    assert b.key_material_offset == a.key_material_offset + 48 + 17 + 6
    assert msg.shared_offset == len(data) - len(EPUB + CT)
    assert msg.ciphertext_offset == msg.shared_offset + 32
    assert msg.ciphertext_length == len(CT)
    assert msg.shared_part() == EPUB + CT
    assert msg.recipient_part(b) == c_of(0xB2) + at_of(0xB2)
    payload = msg.payload_for(b)
    assert payload == b"\x22" + c_of(0xB2) + at_of(0xB2) + EPUB + CT
    assert MultiRecipientMessage.assemble(msg.recipient_part(b), msg.shared_part()) == payload
    assert msg.received_message_length == len(payload)
    assert msg.data == data


def test_payload_is_always_version_0x22() -> None:
    for version in (0x22, 0x23):
        msg = parse(build(version, [(0, 0xA1, [(1, 1)])]))
        assert msg.payload_for(next(iter(msg.recipients.values())))[0] == 0x22


def test_accepts_bytearray_and_memoryview() -> None:
    data = build(0x23, [(0, 0xA1, [(1, 1)])])
    for form in (bytearray(data), memoryview(data), memoryview(b"xx" + data)[2:]):
        msg = parse(form)
        assert msg.data == data
        assert msg.payload_for(msg.recipients[key(0, 0xA1)]) == b"\x22" + c_of(0xA1) + at_of(0xA1) + EPUB + CT


def test_registration_id_bit_14_is_ignored() -> None:
    raw = bytes([0x23, 1]) + key(0, 0xA1) + b"\x01" + (0x4000 | 0x1234).to_bytes(2, "big")
    msg = parse(raw + c_of(1) + at_of(1) + EPUB + CT)
    assert msg.recipients[key(0, 0xA1)].devices == [(1, 0x1234)]


def test_two_byte_count() -> None:
    entries: list[Entry] = [(i & 1, i, [(1 + i % 127, i)]) for i in range(300)]
    msg = parse(build(0x23, entries))
    assert len(msg.recipients) == 300
    assert msg.recipients[key(1, 299)].devices == [(1 + 299 % 127, 299)]


def test_zero_recipients_parse_but_nothing_is_deliverable() -> None:
    msg = parse(build(0x23, []))
    assert msg.recipients == {} and msg.deliverable == []


# ---------------------------------------------------------------- excluded and repeated recipients


def test_excluded_recipients() -> None:
    msg = parse(build(0x23, [(0, 0xA1, [(1, 1)]), (1, 0xB2, None), (0, 0xC3, None)]))
    excluded = msg.recipients[key(1, 0xB2)]
    assert excluded.excluded and excluded.devices == []
    assert (excluded.c, excluded.at, excluded.key_material_offset) == (b"", b"", None)
    assert [r.service_id_bytes for r in msg.excluded] == [key(1, 0xB2), key(0, 0xC3)]
    assert [r.service_id_bytes for r in msg.deliverable] == [key(0, 0xA1)]
    with pytest.raises(ValueError, match="excluded"):
        msg.payload_for(excluded)
    with pytest.raises(ValueError, match="excluded"):
        msg.recipient_part(excluded)


def test_only_excluded_recipients() -> None:
    msg = parse(build(0x22, [(0, 0xA1, None), (0, 0xB2, None)]))
    assert len(msg.recipients) == 2 and msg.deliverable == []


def test_repeated_recipient_merges_devices_and_keeps_first_key_material() -> None:
    data = bytearray(build(0x23, [(0, 0xA1, [(1, 1)]), (1, 0xB2, [(1, 2)]), (0, 0xA1, [(2, 3), (3, 4)])]))
    data[-len(EPUB + CT) - 48 : -len(EPUB + CT)] = b"\x5a" * 48  # the repeat's c ‖ at differ
    msg = parse(bytes(data))
    assert list(msg.recipients) == [key(0, 0xA1), key(1, 0xB2)]  # order of first appearance
    a = msg.recipients[key(0, 0xA1)]
    assert a.devices == [(1, 1), (2, 3), (3, 4)]
    assert (a.c, a.at) == (c_of(0xA1), at_of(0xA1))
    assert a.key_material_offset == 1 + 1 + 17 + 3


@pytest.mark.parametrize(
    "entries",
    [
        [(0, 0xA1, None), (0, 0xA1, None)],
        [(0, 0xA1, None), (0, 0xA1, [(1, 1)])],
        [(0, 0xA1, [(1, 1)]), (0, 0xA1, None)],
    ],
    ids=["excluded twice", "excluded then listed", "listed then excluded"],
)
def test_repeated_excluded_recipient_is_malformed(entries: list[Entry]) -> None:
    malformed(build(0x23, entries), "excluded")


@pytest.mark.parametrize(
    "entries",
    [
        [(0, 0xA1, [(1, 1), (1, 1)])],
        [(0, 0xA1, [(4, 1), (4, 2)])],
        [(0, 0xA1, [(1, 1), (2, 2)]), (1, 0xB2, [(2, 2)]), (0, 0xA1, [(2, 2)])],
    ],
    ids=["within one entry", "different registration ids", "across repeated entries"],
)
def test_same_device_twice_is_malformed(entries: list[Entry]) -> None:
    malformed(build(0x23, entries), "same device twice")


# ---------------------------------------------------------------- malformations


@pytest.mark.parametrize("version", [0x00, 0x11, 0x21, 0x24, 0x32, 0x33, 0xFF])
def test_bad_version(version: int) -> None:
    malformed(bytes([version]) + build(0x23, [(0, 0xA1, [(1, 1)])])[1:], "unsupported version")


def test_empty_payload() -> None:
    malformed(b"", "empty payload")


@pytest.mark.parametrize(
    ("count_bytes", "match"),
    [
        (b"", "truncated recipient count"),
        (b"\xff\xff", "truncated recipient count"),
        (b"\x81\x00", "not minimally encoded"),
        (b"\x80\x00", "not minimally encoded"),
        (b"\x80\x80\x80\x80\x10", "32 bits"),
        (b"\xff" * 9 + b"\x01", "32 bits"),
        (b"\xff\xff\xff\xff\x0f", "does not fit"),
    ],
)
def test_bad_count(count_bytes: bytes, match: str) -> None:
    terminated = bool(count_bytes) and count_bytes[-1] < 0x80
    body = build(0x23, [(0, 0xA1, [(1, 1)])])[2:] if terminated else b""
    malformed(b"\x23" + count_bytes + body, match)


def test_count_larger_than_entries() -> None:
    malformed(build(0x23, [(0, 0xA1, [(1, 1)])], count=2), "truncated|does not fit")
    malformed(build(0x23, [(0, 0xA1, [(1, 1)])], count=1_000_000), "count 1000000 does not fit")


def test_count_smaller_than_entries_reads_the_rest_as_shared_bytes() -> None:
    data = build(0x23, [(0, 0xA1, [(1, 1)]), (0, 0xB2, [(2, 2)])], count=1)
    msg = parse(data)
    assert list(msg.recipients) == [key(0, 0xA1)]
    assert msg.shared_offset == 1 + 1 + 17 + 3 + 48


@pytest.mark.parametrize("device_id", [128, 200, 255])
def test_device_id_above_127(device_id: int) -> None:
    malformed(build(0x23, [(0, 0xA1, [(device_id, 1)])]), f"device id {device_id}")
    malformed(build(0x23, [(0, 0xA1, [(1, 1), (device_id, 1)])]), f"device id {device_id}")


def test_device_id_zero_after_devices() -> None:
    raw = bytes([0x23, 1]) + key(0, 0xA1) + devices([(1, 1)], more_last=True) + b"\x00"
    malformed(raw + c_of(1) + at_of(1) + EPUB + CT, "device id 0")


@pytest.mark.parametrize("kind", [0x02, 0x10, 0xFF])
def test_unknown_service_id_kind(kind: int) -> None:
    malformed(build(0x23, [(kind, 0xA1, [(1, 1)])]), f"unknown service id kind 0x{kind:02x}")


@pytest.mark.parametrize(
    ("tail", "match"),
    [(b"", "truncated ephemeral"), (EPUB[:31], "truncated ephemeral"), (EPUB, "empty shared ciphertext")],
)
def test_bad_tail(tail: bytes, match: str) -> None:
    malformed(build(0x23, [(0, 0xA1, [(1, 1)])], tail=tail), match)


def test_one_byte_ciphertext_is_enough() -> None:
    assert parse(build(0x23, [(0, 0xA1, [(1, 1)])], tail=EPUB + b"x")).ciphertext_length == 1


FULL_A = key(0, 0xA1) + devices([(1, 1)]) + c_of(0xA1) + at_of(0xA1)


@pytest.mark.parametrize(
    ("second", "match"),
    [
        (key(0, 0xB2)[:10], "truncated service id of recipient #1"),
        (key(0, 0xB2), "truncated device list of recipient #1"),
        (key(0, 0xB2) + b"\x01\x00", "truncated registration id of recipient #1"),
        (key(0, 0xB2) + devices([(1, 1)]) + b"k" * 47, "truncated key material of recipient #1"),
    ],
)
def test_truncated_fields(second: bytes, match: str) -> None:
    # A complete first recipient leaves enough bytes for the count check, so the parser reaches the cut.
    malformed(bytes([0x23, 2]) + FULL_A + second, match)


def test_every_truncation_of_a_valid_message_is_malformed() -> None:
    data = build(0x23, [(0, 0xA1, [(1, 1), (2, 2)]), (1, 0xB2, None), (0, 0xC3, [(3, 3)])])
    for end in range(len(data) - len(CT)):
        with pytest.raises(MalformedMultiRecipientMessage):
            parse(data[:end])
    for end in range(len(data) - len(CT) + 1, len(data) + 1):
        assert parse(data[:end]).ciphertext_length == end - (len(data) - len(CT))


def test_has_more_on_last_device_is_malformed_when_it_runs_out() -> None:
    raw = bytes([0x23, 1]) + key(0, 0xA1) + devices([(1, 1)], more_last=True) + c_of(1) + at_of(1) + EPUB + CT
    with pytest.raises(MalformedMultiRecipientMessage):
        parse(raw)


def test_error_is_a_value_error() -> None:
    assert issubclass(MalformedMultiRecipientMessage, ValueError)


# ---------------------------------------------------------------- helpers on the parsed message


def test_payload_for_a_foreign_recipient_is_refused() -> None:
    one = parse(build(0x23, [(0, 0xA1, [(1, 1)])]))
    other = parse(build(0x23, [(0, 0xA1, [(1, 1)])], tail=EPUB + b"other"))
    with pytest.raises(ValueError, match="not part of this message"):
        one.payload_for(other.recipients[key(0, 0xA1)])


def test_assemble_checks_lengths() -> None:
    with pytest.raises(ValueError, match="48 bytes"):
        MultiRecipientMessage.assemble(b"x" * 47, EPUB + CT)
    with pytest.raises(ValueError, match="longer than 32"):
        MultiRecipientMessage.assemble(b"x" * 48, EPUB)


# ---------------------------------------------------------------- libsignal-made payloads


def _check_against_libsignal_view(msg: MultiRecipientMessage, view: dict[str, Any]) -> None:
    deliverable = msg.deliverable
    assert [r.service_id_string for r in deliverable] == [r["service_id"] for r in view["recipients"]]
    for ours, theirs in zip(deliverable, view["recipients"], strict=True):
        assert [list(d) for d in ours.devices] == theirs["devices"]
        assert ours.key_material_offset == theirs["key_material_offset"]
    assert [r.service_id_string for r in msg.excluded] == view["excluded"]
    assert msg.shared_offset == view["shared_offset"]


@pytest.mark.parametrize("vector", VECTORS, ids=_ids(VECTORS))
def test_libsignal_vector(vector: dict[str, Any]) -> None:
    data = _b64(vector["payload"])
    msg = parse(data)
    assert msg.version == data[0]
    _check_against_libsignal_view(msg, vector)
    for ours, theirs in zip(msg.deliverable, vector["recipients"], strict=True):
        payload = msg.payload_for(ours)
        if "received_message" in theirs:
            assert payload == _b64(theirs["received_message"])
        else:
            assert hashlib.sha256(payload).hexdigest() == theirs["received_message_sha256"]
        assert MultiRecipientMessage.assemble(msg.recipient_part(ours), msg.shared_part()) == payload
        assert len(payload) == msg.received_message_length
    if "single_recipient_message" in vector:
        (only,) = msg.deliverable
        assert msg.payload_for(only) == _b64(vector["single_recipient_message"])


def test_libsignal_vectors_cover_the_interesting_shapes() -> None:
    parsed = [parse(_b64(v["payload"])) for v in VECTORS]
    assert {m.version for m in parsed} == {0x22, 0x23}
    assert any(r.is_pni for m in parsed for r in m.deliverable)
    assert any(r.is_pni for m in parsed for r in m.excluded)
    assert any(len(r.devices) >= 3 for m in parsed for r in m.deliverable)
    assert any(127 in r.device_ids for m in parsed for r in m.deliverable)
    assert any(reg == 16383 for m in parsed for r in m.deliverable for _, reg in r.devices)
    assert any(len(m.deliverable) >= 10 for m in parsed)
    assert sum("single_recipient_message" in v for v in VECTORS) >= 2
    # The repeated-recipient vectors: libsignal itself emits a recipient twice when its devices
    # are not adjacent in the destination list.
    repeated = 0
    for vector, msg in zip(VECTORS, parsed, strict=True):
        data = _b64(vector["payload"])
        width = 16 if msg.version == 0x22 else 17
        for r in msg.deliverable:
            needle = r.service_id_bytes[17 - width :]
            if data.count(needle, 0, msg.shared_offset) > 1:
                repeated += 1
    assert repeated >= 2


def _libsignal_would_be_accepted_by_us(case: dict[str, Any], data: bytes) -> bool:
    """libsignal's verdict, adjusted by the rules where the server is deliberately stricter."""
    if not case["libsignal_accepts"]:
        return False
    if len(data) - case["shared_offset"] == 32:  # empty shared ciphertext
        return False
    if any(len({d for d, _ in r["devices"]}) != len(r["devices"]) for r in case["recipients"]):
        return False  # the same device twice
    pos = 1
    while data[pos] & 0x80:
        pos += 1
    return not (pos > 1 and data[pos] == 0)  # non-minimal count varint


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_agrees_with_libsignal_parser(case: dict[str, Any]) -> None:
    data = _b64(case["payload"])
    if _libsignal_would_be_accepted_by_us(case, data):
        _check_against_libsignal_view(parse(data), case)
    else:
        with pytest.raises(MalformedMultiRecipientMessage):
            parse(data)


def test_parse_cases_exercise_both_verdicts_and_the_stricter_rules() -> None:
    verdicts = [(c["libsignal_accepts"], _libsignal_would_be_accepted_by_us(c, _b64(c["payload"]))) for c in CASES]
    assert (True, True) in verdicts and (False, False) in verdicts
    assert sum(1 for v in verdicts if v == (True, False)) >= 5  # empty ciphertext, duplicates, varint
    assert sum(1 for c in CASES if c["note"].startswith("mutation")) >= 100


# ---------------------------------------------------------------- fuzzing


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_malformed(data: bytes) -> None:
    try:
        parse(data)
    except MalformedMultiRecipientMessage:
        pass


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from([0x22, 0x23]), st.binary(max_size=300))
def test_random_bodies_after_a_valid_version_only_raise_malformed(version: int, body: bytes) -> None:
    try:
        msg = parse(bytes([version]) + body)
    except MalformedMultiRecipientMessage:
        return
    for r in msg.deliverable:
        assert len(msg.payload_for(r)) == msg.received_message_length


_device_lists = st.lists(
    st.tuples(st.integers(1, 127), st.integers(0, 0x3FFF)), min_size=1, max_size=6, unique_by=lambda d: d[0]
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([0x22, 0x23]),
    st.lists(
        st.tuples(st.integers(0, 1), st.binary(min_size=16, max_size=16), st.none() | _device_lists),
        max_size=12,
        unique_by=lambda e: (e[0], e[1]),
    ),
    st.binary(min_size=1, max_size=64),
)
def test_generated_messages_round_trip(
    version: int, entries: list[tuple[int, bytes, list[tuple[int, int]] | None]], ciphertext: bytes
) -> None:
    if version == 0x22:
        unique: dict[bytes, tuple[int, bytes, list[tuple[int, int]] | None]] = {}
        for kind, raw_uuid, devs in entries:
            unique.setdefault(raw_uuid, (0, raw_uuid, devs))
        entries = list(unique.values())
    out = bytearray([version]) + varint(len(entries))
    for i, (kind, raw_uuid, devs) in enumerate(entries):
        out += (bytes([kind]) if version == 0x23 else b"") + raw_uuid
        out += b"\x00" if devs is None else devices(devs) + bytes([i]) * 48
    out += EPUB + ciphertext
    msg = parse(bytes(out))
    assert [r.service_id_bytes for r in msg.recipients.values()] == [bytes([k]) + u for k, u, _ in entries]
    for i, (r, (kind, _, devs)) in enumerate(zip(msg.recipients.values(), entries, strict=True)):
        assert r.is_pni == (kind == 1)
        assert r.devices == (devs or [])
        if devs:
            assert msg.payload_for(r) == b"\x22" + bytes([i]) * 48 + EPUB + ciphertext


def test_constants_match_the_format() -> None:
    assert (mr.C_LENGTH, mr.AT_LENGTH, mr.E_PUB_LENGTH, mr.SERVICE_ID_LENGTH) == (32, 16, 32, 17)


def test_overlong_device_list_stops_at_the_first_impossible_device() -> None:
    pairs = [(1 + i % 127, i) for i in range(128)]
    malformed(build(0x23, [(0, 0xA1, pairs)]), "same device twice")
