"""Read and write config.pbtxt (protobuf text format, Triton's field names)."""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import text_format

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
