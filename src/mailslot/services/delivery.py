"""The delivery pipeline (digest §5, §6.4; ARCHITECTURE.md): send → queue → notify → deliver → ack → receipt.

Durability: a send's envelopes are committed in one transaction before its 200. An envelope leaves
the queue only when the receiving device acknowledges it (or it expires). After the commit the
envelopes are handed to the receiving socket in memory; the queue is read back only on connect, after
a restart, or when that hand-over overflowed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mailslot.config import DeliverySettings
from mailslot.crypto.atrest import AtRestError, AtRestKeyring
from mailslot.crypto.multirecipient import MalformedMultiRecipientMessage, MultiRecipientMessage
from mailslot.crypto.multirecipient import parse as parse_multi_recipient
from mailslot.observability.metrics import MESSAGES_STORED, observe_delivery
from mailslot.protocol.envelope_pb2 import Envelope
from mailslot.services.credentials import Principal
from mailslot.services.errors import ServiceError, invalid
from mailslot.services.keys import ServiceId, check_access_key, unauthorized
from mailslot.services.presence import DeviceKey, LocalPresence, Outgoing
from mailslot.services.ratelimit import RateLimiters
from mailslot.stores.interfaces import AccountStore, MessageStore
from mailslot.stores.models import Account, NewMessage, SharedPayload, StoredMessage

log = logging.getLogger("mailslot.delivery")

ALLOWED_TYPES = frozenset({1, 3, 6, 8})
RECEIPT_TYPE = 5
UNIDENTIFIED_SENDER = 6
MAX_TIMESTAMP = 8_640_000_000_000_000
_CONTENT_TAG = b"\x42"  # field 8, length-delimited


@dataclass(slots=True)
class IncomingMessage:
    type: int
    destination_device_id: int
    destination_registration_id: int
    content: bytes


@dataclass(slots=True)
class SendRequest:
    messages: list[IncomingMessage]
    timestamp: int
    online: bool
    urgent: bool


def compact_service_id(aci_or_pni: uuid.UUID, is_pni: bool) -> bytes:
    return (b"\x01" + aci_or_pni.bytes) if is_pni else aci_or_pni.bytes


def service_id_string(value: uuid.UUID, is_pni: bool) -> str:
    return f"PNI:{value}" if is_pni else str(value)


def _append_content(envelope: bytes, content: bytes) -> bytes:
    """Serialized protobuf fields concatenate: adding field 8 to stored bytes needs no re-encode."""
    length = len(content)
    prefix = bytearray(_CONTENT_TAG)
    while True:
        byte = length & 0x7F
        length >>= 7
        if length:
            prefix.append(byte | 0x80)
        else:
            prefix.append(byte)
            break
    return envelope + bytes(prefix) + content


def _now_ms() -> int:
    return int(time.time() * 1000)


def _mismatched(account: Account, wanted: dict[int, int], skip_device: int | None, identity_is_pni: bool,
                stale_first: bool) -> None:
    """The device-set rules of §5.1: 410 for stale registration ids, 409 for missing/extra devices."""
    expected = {d.device_id for d in account.devices if d.device_id != skip_device}
    missing = sorted(expected - wanted.keys())
    extra = sorted(wanted.keys() - expected)
    stale = []
    for device in account.devices:
        if device.device_id in wanted:
            registration_id = device.pni_registration_id if identity_is_pni else device.registration_id
            if registration_id is None or registration_id != wanted[device.device_id]:
                stale.append(device.device_id)

    def conflict() -> None:
        if missing or extra:
            raise ServiceError(409, "mismatched_devices", "device list does not match",
                               body={"missingDevices": missing, "extraDevices": extra})

    if not stale_first:
        conflict()
    if stale:
        raise ServiceError(410, "stale_devices", "registration ids do not match",
                           body={"staleDevices": sorted(stale)})
    conflict()


@dataclass(slots=True)
class _Write:
    messages: list[NewMessage]
    shared: list[SharedPayload]
    deletes: list[tuple[uuid.UUID, int, int]]
    done: asyncio.Future[list[int]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommit:
    """Writes of concurrent requests share one transaction.

    A write waits while the previous transaction commits, then goes with every write that arrived
    meanwhile. Nothing is answered before its transaction has committed, so durability holds; the
    number of commits per second stops bounding the number of messages per second.
    """

    def __init__(self, store: MessageStore, max_batch: int = 500) -> None:
        self.store = store
        self.max_batch = max_batch
        self._pending: list[_Write] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(
        self,
        messages: list[NewMessage],
        shared: list[SharedPayload] | None = None,
        deletes: list[tuple[uuid.UUID, int, int]] | None = None,
    ) -> list[int]:
        write = _Write(messages, shared or [], deletes or [])
        self._pending.append(write)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return await write.done

    async def _run(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            messages = [m for w in batch for m in w.messages]
            shared = [p for w in batch for p in w.shared]
            deletes = [d for w in batch for d in w.deletes]
            try:
                ids = await self.store.apply(messages, shared, deletes)
            except Exception as exc:
                for write in batch:
                    if not write.done.done():
                        write.done.set_exception(exc)
                continue
            MESSAGES_STORED.inc(len(messages))
            start = 0
            for write in batch:
                count = len(write.messages)
                if not write.done.done():
                    write.done.set_result(ids[start : start + count])
                start += count


class BlockChecker(Protocol):
    async def is_blocked(self, recipient: uuid.UUID, sender_aci: uuid.UUID, sender_pni: uuid.UUID | None) -> bool: ...


class DeliveryService:
    def __init__(
        self,
        accounts: AccountStore,
        messages: MessageStore,
        limiters: RateLimiters,
        keyring: AtRestKeyring,
        settings: DeliverySettings,
        presence: LocalPresence,
    ) -> None:
        self.accounts = accounts
        self.messages = messages
        self.limiters = limiters
        self.keyring = keyring
        self.settings = settings
        self.presence = presence
        # Set by the composition root: identified sends from blocked senders are dropped silently.
        self.blocks: BlockChecker | None = None
        self.writer = GroupCommit(messages)
        self._ephemeral_ids = -1

    # -- at rest ------------------------------------------------------------------------------------

    @staticmethod
    def _row_ad(aci: uuid.UUID, device_id: int, guid: uuid.UUID) -> bytes:
        return aci.bytes + device_id.to_bytes(1, "big") + guid.bytes

    def _expiry(self) -> int:
        return int(time.time() + self.settings.message_ttl_days * 86400)

    def _open(self, aci: uuid.UUID, device_id: int, row: StoredMessage) -> Outgoing:
        envelope = self.keyring.open(row.envelope, self._row_ad(aci, device_id, row.guid))
        if row.shared_id is not None:
            if row.shared_data is None or row.recipient_part is None:
                raise AtRestError("shared payload is gone")
            shared = self.keyring.open(row.shared_data, row.shared_id.bytes)
            envelope = _append_content(envelope, MultiRecipientMessage.assemble(row.recipient_part, shared))
        return Outgoing(row.id, row.guid, envelope, Envelope.FromString(envelope).story, queued=True)

    # -- sending ------------------------------------------------------------------------------------

    def _validate(self, request: SendRequest) -> dict[int, int]:
        if not request.messages:
            raise invalid("messages must not be empty", "messages")
        if not 0 <= request.timestamp <= MAX_TIMESTAMP:
            raise invalid("timestamp out of range", "timestamp")
        wanted: dict[int, int] = {}
        for message in request.messages:
            if message.type not in ALLOWED_TYPES:
                raise invalid(f"message type {message.type} is not allowed", "messages.type")
            if message.destination_device_id in wanted:
                raise invalid("a device is named twice", "messages.destinationDeviceId")
            if not message.content:
                raise invalid("content must not be empty", "messages.content")
            if len(message.content) > self.settings.max_message_bytes:
                raise ServiceError(413, "payload_too_large", "a message is larger than the limit")
            wanted[message.destination_device_id] = message.destination_registration_id
        return wanted

    async def send(
        self,
        sender: Principal | None,
        access_key: bytes | None,
        destination: str,
        request: SendRequest,
        story: bool = False,
    ) -> dict[str, Any]:
        service_id = ServiceId.parse(destination)
        wanted = self._validate(request)
        if service_id is None:
            if sender is None and not story:
                raise unauthorized()
            raise ServiceError(404, "not_found", "destination not found")
        target = (
            await self.accounts.get_by_pni(service_id.uuid) if service_id.is_pni
            else await self.accounts.get_by_aci(service_id.uuid)
        )
        is_sync = sender is not None and target is not None and target.aci == sender.aci
        if story:
            if target is None:
                return {"needsSync": False}  # no existence oracle for stories
        elif sender is None:
            target = check_access_key(target, service_id.is_pni, access_key)
        elif target is None:
            raise ServiceError(404, "not_found", "destination not found")
        assert target is not None
        if is_sync and service_id.is_pni:
            raise ServiceError(403, "forbidden", "sync messages go to the account's ACI")
        _mismatched(target, wanted, sender.device_id if is_sync and sender else None, service_id.is_pni, True)
        total_bytes = sum(len(m.content) for m in request.messages)
        checks: list[tuple[str, str, float]] = []
        if sender is not None and not is_sync and not story:
            checks.append(("messages", f"{sender.aci}__{target.aci}", 1))
        checks.append(("inboundMessageBytes", str(target.aci), total_bytes))
        await self.limiters.check_many(checks)
        needs_sync = sender is not None and not is_sync and not story and len(sender.account.devices) > 1
        if (sender is not None and not is_sync and not story and self.blocks is not None
                and await self.blocks.is_blocked(target.aci, sender.aci, sender.account.pni)):
            # Answered as usual, delivered to nobody: the sender cannot tell a block from an offline peer.
            return {"needsSync": needs_sync}

        now = _now_ms()
        timestamp = request.timestamp or now
        destination_bytes = compact_service_id(service_id.uuid, service_id.is_pni)
        destination_text = service_id_string(service_id.uuid, service_id.is_pni)
        by_device = {m.destination_device_id: m for m in request.messages}
        outgoing: list[tuple[DeviceKey, Outgoing, bytes]] = []
        for device_id in sorted(by_device):
            message = by_device[device_id]
            guid = uuid.uuid4()
            envelope = Envelope(
                type=message.type,  # type: ignore[arg-type]
                client_timestamp=timestamp,
                server_timestamp=now,
                destination_service_id=destination_bytes,
                destination_service_id_string=destination_text,
                server_guid=guid.bytes,
                server_guid_string=str(guid),
                urgent=request.urgent,
                content=message.content,
            )
            if story:
                envelope.story = True
            if sender is not None and not story:
                envelope.source_service_id = sender.aci.bytes
                envelope.source_service_id_string = str(sender.aci)
                envelope.source_device = sender.device_id
            outgoing.append(((target.aci, device_id), Outgoing(0, guid, b"", story), envelope.SerializeToString()))
        await self._enqueue(outgoing, request.online)
        return {"needsSync": needs_sync}

    async def _enqueue(self, items: list[tuple[DeviceKey, Outgoing, bytes]], ephemeral: bool) -> None:
        """Commit (unless ephemeral) and hand over to present devices."""
        if not ephemeral:
            await self._store_and_notify(items, [])
            return
        for key, out, envelope in items:
            # Ephemeral messages are never stored: only a device connected now gets them.
            if self.presence.might_be_present(key):
                self._ephemeral_ids -= 1
                out.id = self._ephemeral_ids
                out.envelope = envelope
                self.presence.notify(key, [out])

    async def send_multi_recipient(
        self, access_key: bytes | None, payload: bytes, timestamp: int, online: bool, urgent: bool, story: bool,
    ) -> dict[str, Any]:
        if not payload:
            raise ServiceError(400, "bad_request", "empty multi-recipient payload")
        if not 0 <= timestamp <= MAX_TIMESTAMP:
            raise ServiceError(400, "bad_request", "timestamp out of range")
        try:
            message = parse_multi_recipient(payload)
        except MalformedMultiRecipientMessage as exc:
            raise ServiceError(400, "bad_request", f"malformed multi-recipient payload: {exc}") from exc
        recipients = message.deliverable
        if not recipients:
            raise ServiceError(400, "bad_request", "no recipients")
        if not story and access_key is None:
            raise unauthorized()
        targets: list[tuple[Any, Account]] = []
        if any(r.is_pni for r in recipients) and not story:
            raise unauthorized()
        by_aci = await self.accounts.get_many_by_aci([r.uuid for r in recipients if not r.is_pni])
        for recipient in recipients:
            account = await self.accounts.get_by_pni(recipient.uuid) if recipient.is_pni else by_aci.get(recipient.uuid)
            if account is None:
                if story:
                    continue
                raise ServiceError(404, "not_found", "a recipient was not found")
            targets.append((recipient, account))
        if not story:
            combined = bytes(16)
            for _, account in targets:
                if account.unrestricted_unidentified_access:
                    continue
                uak = account.unidentified_access_key
                if uak is None:
                    raise unauthorized()
                combined = bytes(a ^ b for a, b in zip(combined, uak, strict=True))
            if access_key is None or len(access_key) != 16 or not hmac.compare_digest(combined, access_key):
                raise unauthorized()
        mismatched: list[dict[str, Any]] = []
        stale: list[dict[str, Any]] = []
        for recipient, account in targets:
            wanted = dict(recipient.devices)
            try:
                _mismatched(account, wanted, None, recipient.is_pni, stale_first=False)
            except ServiceError as exc:
                entry = {"uuid": recipient.service_id_string, "devices": exc.body}
                (mismatched if exc.status == 409 else stale).append(entry)
        if mismatched:
            raise ServiceError(409, "mismatched_devices", "device lists do not match", body=mismatched)  # type: ignore[arg-type]
        if stale:
            raise ServiceError(410, "stale_devices", "registration ids do not match", body=stale)  # type: ignore[arg-type]
        if message.received_message_length > self.settings.max_message_bytes:
            raise ServiceError(413, "payload_too_large", "the message is larger than the limit")
        await self.limiters.check_many(
            [("inboundMessageBytes", str(account.aci), message.received_message_length) for _, account in targets]
        )

        now = _now_ms()
        shared_plain = message.shared_part()
        shared_id = uuid.uuid4()
        expires = self._expiry()
        shared = SharedPayload(shared_id, self.keyring.seal(shared_plain, shared_id.bytes), expires)
        stored_rows: list[NewMessage] = []
        handover: list[tuple[DeviceKey, Outgoing]] = []
        for recipient, account in targets:
            destination_bytes = compact_service_id(recipient.uuid, recipient.is_pni)
            part = message.recipient_part(recipient)
            for device_id, _ in recipient.devices:
                guid = uuid.uuid4()
                envelope = Envelope(
                    type=UNIDENTIFIED_SENDER,  # type: ignore[arg-type]
                    client_timestamp=timestamp or now,
                    server_timestamp=now,
                    destination_service_id=destination_bytes,
                    destination_service_id_string=recipient.service_id_string,
                    server_guid=guid.bytes,
                    server_guid_string=str(guid),
                    urgent=urgent,
                )
                if story:
                    envelope.story = True
                head = envelope.SerializeToString()
                key = (account.aci, device_id)
                full = _append_content(head, MultiRecipientMessage.assemble(part, shared_plain))
                out = Outgoing(0, guid, full, story)
                if online:
                    if self.presence.might_be_present(key):
                        self._ephemeral_ids -= 1
                        out.id = self._ephemeral_ids
                        self.presence.notify(key, [out])
                    continue
                stored_rows.append(NewMessage(account.aci, device_id, guid,
                                              self.keyring.seal(head, self._row_ad(account.aci, device_id, guid)),
                                              expires, shared_id, part))
                handover.append((key, out))
        if stored_rows:
            ids = await self.writer.submit(stored_rows, [shared])
            for (key, out), row_id in zip(handover, ids, strict=True):
                out.id = row_id
                self.presence.notify(key, [out])
        return {"uuids404": []}

    # -- reading and acknowledging ------------------------------------------------------------------

    async def fetch(self, aci: uuid.UUID, device_id: int, exclude: set[int], limit: int = 100) -> list[Outgoing]:
        rows = await self.messages.fetch(aci, device_id, exclude, limit, int(time.time()))
        result: list[Outgoing] = []
        for row in rows:
            try:
                result.append(self._open(aci, device_id, row))
            except AtRestError:
                log.error("queued envelope cannot be opened; dropping it", extra={"message_id": row.id})
                await self.messages.delete(aci, device_id, [row.id])
        return result

    async def acknowledge(self, aci: uuid.UUID, device_id: int, message: Outgoing) -> None:
        await self.acknowledge_many(aci, device_id, [message])

    async def acknowledge_many(self, aci: uuid.UUID, device_id: int, messages: Sequence[Outgoing]) -> None:
        """Delete acknowledged envelopes and queue the senders' delivery receipts, in one group commit."""
        receipts: list[tuple[DeviceKey, Outgoing, bytes]] = []
        for message in messages:
            receipts.extend(await self._receipts(aci, device_id, message))
        deletes = [(aci, device_id, m.id) for m in messages if m.id > 0]
        await self._store_and_notify(receipts, deletes)

    async def _store_and_notify(
        self, items: list[tuple[DeviceKey, Outgoing, bytes]], deletes: list[tuple[uuid.UUID, int, int]]
    ) -> None:
        expires = self._expiry()
        rows = [
            NewMessage(key[0], key[1], out.guid, self.keyring.seal(envelope, self._row_ad(key[0], key[1], out.guid)),
                       expires)
            for key, out, envelope in items
        ]
        ids = await self.writer.submit(rows, deletes=deletes)
        for (key, out, envelope), row_id in zip(items, ids, strict=True):
            out.id = row_id
            out.envelope = envelope
            self.presence.notify(key, [out])

    async def _receipts(
        self, aci: uuid.UUID, device_id: int, message: Outgoing
    ) -> list[tuple[DeviceKey, Outgoing, bytes]]:
        """Server delivery receipts (type 5) for identified, non-receipt, non-self envelopes (§5.3)."""
        envelope = Envelope.FromString(message.envelope)
        observe_delivery(envelope.server_timestamp, "queued" if message.queued else "live")
        if envelope.type == RECEIPT_TYPE or not envelope.HasField("source_service_id"):
            return []
        try:
            source = uuid.UUID(bytes=envelope.source_service_id)
        except ValueError:
            return []
        if source == aci:
            return []
        account = await self.accounts.get_by_aci(source)
        if account is None:
            return []
        now = _now_ms()
        items: list[tuple[DeviceKey, Outgoing, bytes]] = []
        for device in account.devices:
            guid = uuid.uuid4()
            receipt = Envelope(
                type=RECEIPT_TYPE,  # type: ignore[arg-type]
                source_service_id=envelope.destination_service_id,
                source_service_id_string=envelope.destination_service_id_string,
                source_device=device_id,
                destination_service_id=source.bytes,
                destination_service_id_string=str(source),
                client_timestamp=envelope.client_timestamp,
                server_timestamp=now,
                server_guid=guid.bytes,
                server_guid_string=str(guid),
                urgent=False,
            )
            items.append(((source, device.device_id), Outgoing(0, guid, b""), receipt.SerializeToString()))
        return items

    async def take_by_guid(self, aci: uuid.UUID, device_id: int, guid: uuid.UUID) -> bool:
        """The polling client's acknowledgement (``DELETE /v1/messages/uuid/{guid}``)."""
        row = await self.messages.take_by_guid(aci, device_id, guid)
        if row is None:
            return False
        try:
            message = self._open(aci, device_id, row)
        except AtRestError:
            return True
        message.id = -1  # already deleted: only the receipt is left to do
        await self.acknowledge(aci, device_id, message)
        return True

    async def wait_for_messages(self, aci: uuid.UUID, device_id: int, wait_seconds: float) -> list[Outgoing]:
        """Long-poll: the queue now, or as soon as something arrives within ``wait_seconds``."""
        key = (aci, device_id)
        event = self.presence.add_waiter(key)
        try:
            await self.presence.settle(key)
            messages = await self.fetch(aci, device_id, set())
            if messages or wait_seconds <= 0:
                return messages
            try:
                async with asyncio.timeout(wait_seconds):
                    await event.wait()
            except TimeoutError:
                return []
            return await self.fetch(aci, device_id, set())
        finally:
            self.presence.remove_waiter(key, event)

    async def disconnect(self, aci: uuid.UUID, device_ids: list[int] | None) -> None:
        """Credentials changed or the account/device is gone: close its sockets with 4401."""
        await self.presence.disconnect(aci, device_ids, 4401, "Reauthentication required")

    async def pending_count(self, aci: uuid.UUID, device_id: int) -> int:
        return await self.messages.count(aci, device_id)
