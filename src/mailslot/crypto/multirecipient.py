"""Parser of the sealed-sender v2 multi-recipient payload (reference §5.2).

The body of ``PUT /v1/messages/multi_recipient`` is libsignal's SSv2 "SentMessage"::

    version u8 (0x22: 16-byte ACI recipients | 0x23: 17-byte fixed-width ServiceIds)
    count   varint
    count x { service id, devices | 0x00 (excluded), [c (32) at (16) when there are devices] }
    e_pub   32 bytes
    ciphertext: the rest

Acceptance follows libsignal's ``SealedSenderV2SentMessage::parse``: a recipient may be listed
more than once (its device lists are merged and the first entry's ``c``/``at`` is kept), but an
excluded (device-less) entry may not be repeated or combined with a non-empty one; bit 14 of the
registration-id field is ignored. Where the server must refuse what libsignal's parser lets
through, this parser refuses too: the same device twice for one recipient (a 400 in
Signal-Server), an empty shared ciphertext, and a non-minimal count varint (which libsignal
would misread). A payload of zero recipients, or only excluded ones, parses; the endpoint
rejects it (see :attr:`MultiRecipientMessage.deliverable`).

Each recipient gets the SSv2 "ReceivedMessage" ``0x22 ‖ c ‖ at ‖ e_pub ‖ ciphertext``, whatever
the sent version. The server stores ``e_pub ‖ ciphertext`` once (:meth:`~MultiRecipientMessage.shared_part`)
and ``c ‖ at`` per recipient (:meth:`~MultiRecipientMessage.recipient_part`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Final, TypeAlias

VERSION_ACI_ONLY: Final = 0x22
"""Sent-message version whose recipients are bare 16-byte ACI UUIDs."""
VERSION_SERVICE_ID: Final = 0x23
"""Sent-message version whose recipients are 17-byte fixed-width ServiceIds."""
RECEIVED_MESSAGE_VERSION: Final = 0x22
"""Version byte of the per-recipient ReceivedMessage, whichever version was sent."""

SERVICE_ID_KIND_ACI: Final = 0x00
SERVICE_ID_KIND_PNI: Final = 0x01
UUID_LENGTH: Final = 16
SERVICE_ID_LENGTH: Final = 17
C_LENGTH: Final = 32
AT_LENGTH: Final = 16
RECIPIENT_PART_LENGTH: Final = C_LENGTH + AT_LENGTH
E_PUB_LENGTH: Final = 32
MAX_DEVICE_ID: Final = 127
REGISTRATION_ID_MASK: Final = 0x3FFF
HAS_MORE_FLAG: Final = 0x8000
_MAX_VARINT_BYTES: Final = 5  # enough for any u32, the widest count libsignal accepts
_MAX_COUNT: Final = 0xFFFF_FFFF

ServiceIdKey: TypeAlias = bytes
"""A recipient's 17-byte fixed-width ServiceId (kind byte ‖ UUID), the key of ``recipients``."""


class MalformedMultiRecipientMessage(ValueError):
    """The payload is not a well-formed SSv2 sent message; the text says why."""


@dataclass(slots=True)
class Recipient:
    """One recipient, with all its entries in the payload merged."""

    service_id_bytes: ServiceIdKey
    devices: list[tuple[int, int]]
    """``(device id, registration id)`` pairs in payload order; empty for an excluded recipient."""
    c: bytes
    at: bytes
    key_material_offset: int | None
    """Offset of ``c ‖ at`` within the payload (of the first entry), ``None`` if excluded."""

    @property
    def is_pni(self) -> bool:
        return self.service_id_bytes[0] == SERVICE_ID_KIND_PNI

    @property
    def uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.service_id_bytes[1:])

    @property
    def service_id_string(self) -> str:
        """The ServiceId as text: ``uuid`` for an ACI, ``PNI:uuid`` for a PNI."""
        text = str(self.uuid)
        return "PNI:" + text if self.is_pni else text

    @property
    def excluded(self) -> bool:
        """Listed only so the sender can show it left this recipient out; nothing is delivered."""
        return not self.devices

    @property
    def device_ids(self) -> list[int]:
        return [device_id for device_id, _ in self.devices]


@dataclass(frozen=True, slots=True)
class MultiRecipientMessage:
    """A parsed sent message; byte fields are copies, offsets refer to :attr:`data`."""

    version: int
    recipients: dict[ServiceIdKey, Recipient]
    """All recipients, excluded ones included, in order of first appearance."""
    e_pub: bytes
    shared_offset: int
    """Offset of ``e_pub`` (the start of the shared part) within :attr:`data`."""
    data: bytes = field(repr=False)

    @property
    def ciphertext_offset(self) -> int:
        return self.shared_offset + E_PUB_LENGTH

    @property
    def ciphertext_length(self) -> int:
        return len(self.data) - self.ciphertext_offset

    @property
    def ciphertext(self) -> memoryview:
        """The shared ciphertext, without copying it."""
        return memoryview(self.data)[self.ciphertext_offset :]

    @property
    def deliverable(self) -> list[Recipient]:
        """Recipients with at least one device (what Signal-Server calls the recipient list)."""
        return [r for r in self.recipients.values() if r.devices]

    @property
    def excluded(self) -> list[Recipient]:
        return [r for r in self.recipients.values() if not r.devices]

    @property
    def received_message_length(self) -> int:
        """Size of every recipient's payload, for the per-recipient content-size limit."""
        return 1 + RECIPIENT_PART_LENGTH + len(self.data) - self.shared_offset

    def shared_part(self) -> bytes:
        """``e_pub ‖ ciphertext``: identical for every recipient, so stored once."""
        return self.data[self.shared_offset :]

    def recipient_part(self, recipient: Recipient) -> bytes:
        """``c ‖ at`` for ``recipient`` (48 bytes), the only per-recipient bytes of its payload."""
        self._check_deliverable(recipient)
        return recipient.c + recipient.at

    def payload_for(self, recipient: Recipient) -> bytes:
        """The ReceivedMessage delivered to each of ``recipient``'s devices."""
        return self.assemble(self.recipient_part(recipient), self.shared_part())

    @staticmethod
    def assemble(recipient_part: bytes, shared_part: bytes) -> bytes:
        """Rebuild a ReceivedMessage from its stored halves; equal to :meth:`payload_for`."""
        if len(recipient_part) != RECIPIENT_PART_LENGTH:
            raise ValueError(f"recipient part must be {RECIPIENT_PART_LENGTH} bytes, got {len(recipient_part)}")
        if len(shared_part) <= E_PUB_LENGTH:
            raise ValueError(f"shared part must be longer than {E_PUB_LENGTH} bytes, got {len(shared_part)}")
        return b"".join((bytes((RECEIVED_MESSAGE_VERSION,)), recipient_part, shared_part))

    def _check_deliverable(self, recipient: Recipient) -> None:
        if self.recipients.get(recipient.service_id_bytes) is not recipient:
            raise ValueError("recipient is not part of this message")
        if not recipient.devices:
            raise ValueError(f"recipient {recipient.service_id_string} is excluded and has no key material")


def _malformed(reason: str, offset: int | None = None) -> MalformedMultiRecipientMessage:
    where = "" if offset is None else f" (at byte {offset})"
    return MalformedMultiRecipientMessage(reason + where)


def _read_count(view: memoryview, pos: int) -> tuple[int, int]:
    """Decode the minimally encoded unsigned varint at ``pos``; returns ``(value, next pos)``."""
    value = 0
    end = len(view)
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= end:
            raise _malformed("truncated recipient count", pos)
        byte = view[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise _malformed("recipient count is not minimally encoded", pos)
            if value > _MAX_COUNT:
                raise _malformed("recipient count does not fit in 32 bits", pos)
            return value, pos + i + 1
    raise _malformed("recipient count does not fit in 32 bits", pos)


def parse(data: bytes | bytearray | memoryview) -> MultiRecipientMessage:
    """Parse an SSv2 sent message, raising :class:`MalformedMultiRecipientMessage` if it is not one."""
    raw = data.tobytes() if isinstance(data, memoryview) else bytes(data)
    view = memoryview(raw)
    end = len(view)
    if end == 0:
        raise _malformed("empty payload")

    version = view[0]
    if version == VERSION_ACI_ONLY:
        id_length = UUID_LENGTH
    elif version == VERSION_SERVICE_ID:
        id_length = SERVICE_ID_LENGTH
    else:
        raise _malformed(f"unsupported version 0x{version:02x} (expected 0x22 or 0x23)", 0)

    count, pos = _read_count(view, 1)
    # Cheapest possible recipient: its id plus the one-byte "excluded" marker.
    if count * (id_length + 1) + E_PUB_LENGTH + 1 > end - pos:
        raise _malformed(f"recipient count {count} does not fit in the {end - pos} bytes that follow it", 1)

    recipients: dict[ServiceIdKey, Recipient] = {}
    for index in range(count):
        entry_start = pos
        if pos + id_length > end:
            raise _malformed(f"truncated service id of recipient #{index}", pos)
        if id_length == UUID_LENGTH:
            key = b"\x00" + raw[pos : pos + UUID_LENGTH]
        else:
            key = raw[pos : pos + SERVICE_ID_LENGTH]
            if key[0] not in (SERVICE_ID_KIND_ACI, SERVICE_ID_KIND_PNI):
                raise _malformed(f"unknown service id kind 0x{key[0]:02x} for recipient #{index}", pos)
        pos += id_length

        devices: list[tuple[int, int]] = []
        while True:
            if pos >= end:
                raise _malformed(f"truncated device list of recipient #{index}", pos)
            device_id = view[pos]
            if device_id == 0:
                if devices:
                    raise _malformed(f"device id 0 in the device list of recipient #{index}", pos)
                pos += 1
                break
            if device_id > MAX_DEVICE_ID:
                raise _malformed(f"device id {device_id} of recipient #{index} is above {MAX_DEVICE_ID}", pos)
            if pos + 3 > end:
                raise _malformed(f"truncated registration id of recipient #{index}", pos)
            word = (view[pos + 1] << 8) | view[pos + 2]
            devices.append((device_id, word & REGISTRATION_ID_MASK))
            pos += 3
            if len(devices) > MAX_DEVICE_ID:  # stop early: a longer list must repeat a device
                raise _malformed(f"recipient #{index} lists the same device twice", entry_start)
            if not word & HAS_MORE_FLAG:
                break

        key_offset: int | None = None
        c = at = b""
        if devices:
            if pos + RECIPIENT_PART_LENGTH > end:
                raise _malformed(f"truncated key material of recipient #{index}", pos)
            key_offset = pos
            c = raw[pos : pos + C_LENGTH]
            at = raw[pos + C_LENGTH : pos + RECIPIENT_PART_LENGTH]
            pos += RECIPIENT_PART_LENGTH

        existing = recipients.get(key)
        if existing is None:
            seen = {device_id for device_id, _ in devices}
            if len(seen) != len(devices):
                raise _malformed(f"recipient #{index} lists the same device twice", entry_start)
            recipients[key] = Recipient(key, devices, c, at, key_offset)
            continue
        if not existing.devices or not devices:
            reason = f"recipient #{index} is listed more than once and one of its entries is excluded"
            raise _malformed(reason, entry_start)
        merged = existing.devices + devices
        if len({device_id for device_id, _ in merged}) != len(merged):
            raise _malformed(f"recipient #{index} lists the same device twice", entry_start)
        existing.devices = merged

    if end - pos < E_PUB_LENGTH:
        raise _malformed("truncated ephemeral public key", pos)
    if end - pos == E_PUB_LENGTH:
        raise _malformed("empty shared ciphertext", end)
    return MultiRecipientMessage(version, recipients, raw[pos : pos + E_PUB_LENGTH], pos, raw)
