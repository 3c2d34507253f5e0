from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = ("type", "client_timestamp", "source_device", "content", "server_timestamp", "ephemeral", "urgent", "story", "report_spam_token", "shared_mrm_key", "source_service_id", "destination_service_id", "server_guid", "updated_pni", "source_service_id_string", "destination_service_id_string", "server_guid_string", "updated_pni_string")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[Envelope.Type]
        CIPHERTEXT: _ClassVar[Envelope.Type]
        PREKEY_BUNDLE: _ClassVar[Envelope.Type]
        SERVER_DELIVERY_RECEIPT: _ClassVar[Envelope.Type]
        UNIDENTIFIED_SENDER: _ClassVar[Envelope.Type]
        PLAINTEXT_CONTENT: _ClassVar[Envelope.Type]
    UNKNOWN: Envelope.Type
    CIPHERTEXT: Envelope.Type
    PREKEY_BUNDLE: Envelope.Type
    SERVER_DELIVERY_RECEIPT: Envelope.Type
    UNIDENTIFIED_SENDER: Envelope.Type
    PLAINTEXT_CONTENT: Envelope.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_DEVICE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_FIELD_NUMBER: _ClassVar[int]
    URGENT_FIELD_NUMBER: _ClassVar[int]
    STORY_FIELD_NUMBER: _ClassVar[int]
    REPORT_SPAM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SHARED_MRM_KEY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_GUID_FIELD_NUMBER: _ClassVar[int]
    UPDATED_PNI_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SERVICE_ID_STRING_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_SERVICE_ID_STRING_FIELD_NUMBER: _ClassVar[int]
    SERVER_GUID_STRING_FIELD_NUMBER: _ClassVar[int]
    UPDATED_PNI_STRING_FIELD_NUMBER: _ClassVar[int]
    type: Envelope.Type
    client_timestamp: int
    source_device: int
    content: bytes
    server_timestamp: int
    ephemeral: bool
    urgent: bool
    story: bool
    report_spam_token: bytes
    shared_mrm_key: bytes
    source_service_id: bytes
    destination_service_id: bytes
    server_guid: bytes
    updated_pni: bytes
    source_service_id_string: str
    destination_service_id_string: str
    server_guid_string: str
    updated_pni_string: str
    def __init__(self, type: _Optional[_Union[Envelope.Type, str]] = ..., client_timestamp: _Optional[int] = ..., source_device: _Optional[int] = ..., content: _Optional[bytes] = ..., server_timestamp: _Optional[int] = ..., ephemeral: _Optional[bool] = ..., urgent: _Optional[bool] = ..., story: _Optional[bool] = ..., report_spam_token: _Optional[bytes] = ..., shared_mrm_key: _Optional[bytes] = ..., source_service_id: _Optional[bytes] = ..., destination_service_id: _Optional[bytes] = ..., server_guid: _Optional[bytes] = ..., updated_pni: _Optional[bytes] = ..., source_service_id_string: _Optional[str] = ..., destination_service_id_string: _Optional[str] = ..., server_guid_string: _Optional[str] = ..., updated_pni_string: _Optional[str] = ...) -> None: ...
