"""Protocol messages as the HTTP/REST API writes them in JSON.

The protocol's HTTP answers (metadata, configuration, statistics, the repository index) are
the JSON form of its messages, as Triton writes them: field names as in the .proto files,
64-bit integers as JSON numbers (protobuf's own JSON mapping writes them as strings), enums
by name, every field without presence written even at its default (a client can read
`max_batch_size` of a config that leaves it 0), and message fields only when set.
"""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


def to_json(message: Message) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.has_presence and not message.HasField(field.name):
            continue
        value = getattr(message, field.name)
        if _is_map(field):
            entry = field.message_type.fields_by_name["value"]
            result[field.name] = {str(key): _single(entry, item) for key, item in value.items()}
        elif field.is_repeated:
            result[field.name] = [_single(field, item) for item in value]
        else:
            result[field.name] = _single(field, value)
    return result


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _single(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        return to_json(value)
    if field.enum_type is not None:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    return value
