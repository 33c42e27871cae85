from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConfigureRequest(_message.Message):
    __slots__ = ("properties", "instance_name", "plugin_version")
    class PropertiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_NAME_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    properties: _containers.ScalarMap[str, str]
    instance_name: str
    plugin_version: str
    def __init__(self, properties: _Optional[_Mapping[str, str]] = ..., instance_name: _Optional[str] = ..., plugin_version: _Optional[str] = ...) -> None: ...

class ConfigureResponse(_message.Message):
    __slots__ = ("pipeline_id", "errors")
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    pipeline_id: str
    errors: _containers.RepeatedCompositeFieldContainer[PropertyError]
    def __init__(self, pipeline_id: _Optional[str] = ..., errors: _Optional[_Iterable[_Union[PropertyError, _Mapping]]] = ...) -> None: ...

class PropertyError(_message.Message):
    __slots__ = ("property", "value", "expected")
    PROPERTY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    property: str
    value: str
    expected: str
    def __init__(self, property: _Optional[str] = ..., value: _Optional[str] = ..., expected: _Optional[str] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("pipeline_id", "tag", "chunk")
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    pipeline_id: str
    tag: str
    chunk: bytes
    def __init__(self, pipeline_id: _Optional[str] = ..., tag: _Optional[str] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("status", "events_received", "events_accepted", "events_filtered", "events_invalid", "message")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[PushResponse.Status]
        ACCEPTED: _ClassVar[PushResponse.Status]
        RETRY_LATER: _ClassVar[PushResponse.Status]
        REJECTED: _ClassVar[PushResponse.Status]
    STATUS_UNSPECIFIED: PushResponse.Status
    ACCEPTED: PushResponse.Status
    RETRY_LATER: PushResponse.Status
    REJECTED: PushResponse.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FILTERED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_INVALID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    status: PushResponse.Status
    events_received: int
    events_accepted: int
    events_filtered: int
    events_invalid: int
    message: str
    def __init__(self, status: _Optional[_Union[PushResponse.Status, str]] = ..., events_received: _Optional[int] = ..., events_accepted: _Optional[int] = ..., events_filtered: _Optional[int] = ..., events_invalid: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
