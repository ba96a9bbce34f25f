"""Read and write config.pbtxt (protobuf text format, Triton's field names)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from wire import model_config_pb2

ModelConfig = model_config_pb2.ModelConfig


class ConfigError(ValueError):
    """A config.pbtxt that cannot be read; the message names the file and the problem."""


# Strings and comments (kept as they are), or a field name directly followed by a list.
_LIST_WITHOUT_COLON = re.compile(
    r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|#[^\n]*|([A-Za-z_]\w*)(\s*)\['
)


def _colon_before_lists(text: str) -> str:
    """`field [ {...} ]` -> `field: [ {...} ]`: the same in text format, but protobuf can
    skip an unknown field only in the second spelling, and Triton's docs use the first."""
    return _LIST_WITHOUT_COLON.sub(lambda m: f"{m[1]}:{m[2]}[" if m[1] is not None else m[0], text)


def parse_config(text: str, source: str = "config.pbtxt") -> ModelConfig:
    """Parse text format; fields Triton defines that this server does not use are ignored."""
    config = ModelConfig()
    try:
        text_format.Parse(
            _colon_before_lists(text),
            config,
            allow_unknown_field=True,
            allow_unknown_extension=True,
        )
    except text_format.ParseError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def parse_json_config(text: str) -> ModelConfig:
    """Parse protobuf's JSON mapping of a ModelConfig (Triton's `config` load parameter).

    As in config.pbtxt, fields Triton defines that this server does not use are ignored; the
    rest is checked strictly (types, enum names), enum names case-insensitively as Triton
    reads them. Raises ConfigError with the parser's reason.
    """
    try:
        document = json.loads(text)
    except (RecursionError, ValueError) as exc:
        raise ConfigError(f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"expected a JSON object, got {type(document).__name__}")
    config = ModelConfig()
    try:
        json_format.ParseDict(_known_fields(document, ModelConfig.DESCRIPTOR), config)
    except json_format.ParseError as exc:
        raise ConfigError(str(exc)) from None
    return config


def _known_fields(value: Any, message: Descriptor) -> Any:
    """`value` (a JSON object for `message`) without the keys `message` does not define, enum
    names upper-cased; anything that is not an object is left for the parser to refuse."""
    if not isinstance(value, dict):
        return value
    fields = {**{f.json_name: f for f in message.fields}, **message.fields_by_name}
    return {key: _known_value(item, fields[key]) for key, item in value.items() if key in fields}


def _known_value(value: Any, field: FieldDescriptor) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        entry = field.message_type.fields_by_name["value"]
        if not isinstance(value, dict):
            return value
        return {key: _one(item, entry) for key, item in value.items()}
    if field.is_repeated and isinstance(value, list):
        return [_one(item, field) for item in value]
    return _one(value, field)


def _one(value: Any, field: FieldDescriptor) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _known_fields(value, field.message_type)
    if field.type == FieldDescriptor.TYPE_ENUM and isinstance(value, str):
        return value.upper()
    return value


def load_config(path: Path, shown: str | None = None) -> ModelConfig:
    """Read and parse `path`; messages name it as `shown` (say, relative to the repository,
    when they go to callers who must not learn the server's file system), else as `path`."""
    source = str(path) if shown is None else shown
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{source}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from None
    return parse_config(text, source)


def format_config(config: ModelConfig) -> str:
    return text_format.MessageToString(config)


def write_config(path: Path, config: ModelConfig) -> None:
    path.write_text(format_config(config), encoding="utf-8")


def data_type_name(value: int) -> str:
    """`TYPE_FP32` -> `FP32`, the datatype spelling of the KServe v2 protocol."""
    return model_config_pb2.DataType.Name(value).removeprefix("TYPE_")
