"""Change a few values of a config.pbtxt as text, keeping everything else as it was written.

Parsing into our ModelConfig and printing it back would drop every comment and every field
that this server's subset of Triton's configuration does not define (`optimization`,
`model_warmup`, a queue policy, ...): an operator's file must come back with only the changed
values changed. So the text is scanned as protobuf's text format writes it (fields, nested
messages in braces or angle brackets, lists, quoted strings, comments) into spans, and only
the spans of the edited fields are rewritten or added. Callers check the result by parsing
it (modelrepo.config.parse_config).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from google.protobuf import text_encoding

from modelrepo.config import parse_config


class ConfigEditError(ValueError):
    """The text cannot be edited as asked (malformed, or ambiguous: say, several groups)."""


@dataclass
class Scalar:
    start: int
    end: int


@dataclass
class Block:
    """A message: the top level of the file, or a body between braces (or angle brackets)."""

    start: int  # first character of the body
    end: int  # its closing bracket (the text's length at the top level)
    fields: list[Field] = field(default_factory=list)


@dataclass
class ListValue:
    items: list[Scalar | Block]


@dataclass
class Field:
    name: str
    start: int  # of the name
    end: int  # after the value and its separator (`,` or `;`) if any
    value: Scalar | Block | ListValue

    def blocks(self) -> list[Block]:
        """The messages this field holds: its block, or the blocks of its list."""
        if isinstance(self.value, Block):
            return [self.value]
        if isinstance(self.value, ListValue):
            return [item for item in self.value.items if isinstance(item, Block)]
        return []


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\[[^\]\n]*\]")
_BARE = re.compile(r"[^\s,;:\[\]{}<>#\"']+")
_STRING = re.compile(r"\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'")
_CLOSERS = {"{": "}", "<": ">"}


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> ConfigEditError:
        line = self.text.count("\n", 0, self.pos) + 1
        return ConfigEditError(f"line {line}: {what}")

    def skip(self) -> None:
        """Whitespace and comments."""
        text = self.text
        while self.pos < len(text):
            if text[self.pos].isspace():
                self.pos += 1
            elif text[self.pos] == "#":
                newline = text.find("\n", self.pos)
                self.pos = len(text) if newline < 0 else newline + 1
            else:
                return

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def block(self, start: int, closer: str) -> Block:
        """Fields up to `closer` ("" at the top level); the position ends on the closer."""
        body = Block(start, len(self.text))
        while True:
            char = self.peek()
            if char == closer:
                body.end = self.pos
                return body
            if char in ("", "}", ">"):
                raise self.fail(f"unexpected {char or 'end of text'}")
            body.fields.append(self.field())

    def field(self) -> Field:
        match = _NAME.match(self.text, self.pos)
        if match is None:
            raise self.fail(f"expected a field name at {self.text[self.pos : self.pos + 20]!r}")
        start, name = self.pos, match[0]
        self.pos = match.end()
        if self.peek() == ":":
            self.pos += 1
        value = self.value(allow_list=True)
        end = self.pos
        if self.peek() in (",", ";"):
            self.pos += 1
            end = self.pos
        return Field(name, start, end, value)

    def value(self, allow_list: bool) -> Scalar | Block | ListValue:
        char = self.peek()
        if char in _CLOSERS:
            self.pos += 1
            body = self.block(self.pos, _CLOSERS[char])
            self.pos += 1
            return body
        if char == "[" and allow_list:
            self.pos += 1
            items: list[Scalar | Block] = []
            while self.peek() != "]":
                if not self.peek():
                    raise self.fail("unclosed list")
                item = self.value(allow_list=False)
                if isinstance(item, ListValue):  # pragma: no cover - allow_list is False
                    raise self.fail("nested list")
                items.append(item)
                if self.peek() == ",":
                    self.pos += 1
            self.pos += 1
            return ListValue(items)
        start = self.pos
        if _STRING.match(self.text, self.pos):  # adjacent strings concatenate
            while (match := _STRING.match(self.text, self.pos)) is not None:
                end = self.pos = match.end()
                self.skip()
            self.pos = end
            return Scalar(start, end)
        match = _BARE.match(self.text, self.pos)
        if match is None:
            raise self.fail(f"expected a value at {self.text[self.pos : self.pos + 20]!r}")
        self.pos = match.end()
        return Scalar(start, self.pos)


def scan(text: str) -> Block:
    """The top-level fields of `text`, each with its span and its value's structure."""
    scanner = _Scanner(text)
    top = scanner.block(0, "")
    top.end = len(text)
    return top


def quoted(value: str) -> str:
    """A string literal of text format."""
    return '"' + text_encoding.CEscape(value, as_utf8=True) + '"'


def set_value(text: str, path: tuple[str, ...], literal: str) -> str:
    """`text` with the scalar at `path` (singular message fields, then the scalar's name, as
    ("dynamic_batching", "max_queue_delay_microseconds")) set to `literal`; the field, and
    the messages on its path, are added where missing."""
    return _set_in(text, scan(text), path, literal)


def set_instance_count(text: str, count: int) -> str:
    """`text` with the count of its one instance_group set (a group added when it has none,
    of KIND_AUTO as export writes); several groups are for their author to tune."""
    top = scan(text)
    groups = [b for f in top.fields if f.name == "instance_group" for b in f.blocks()]
    if len(groups) > 1:
        raise ConfigEditError(f"{len(groups)} instance groups: their counts are set by hand")
    if not groups:
        return _insert(text, top, f"instance_group {{\n  count: {count}\n  kind: KIND_AUTO\n}}")
    return _set_in(text, groups[0], ("count",), str(count))


def set_parameter(text: str, key: str, value: str) -> str:
    """`text` with `parameters` entry `key` set to the string `value` (added when absent,
    after the last entry)."""
    top = scan(text)
    entries = [f for f in top.fields if f.name == "parameters"]
    for entry in entries:
        for body in entry.blocks():
            found = parse_config("parameters {" + text[body.start : body.end] + "}")
            if key in found.parameters:
                return _set_in(text, body, ("value", "string_value"), quoted(value))
    new = (
        f"parameters {{\n  key: {quoted(key)}\n"
        f"  value {{\n    string_value: {quoted(value)}\n  }}\n}}"
    )
    if entries:
        return _insert_after(text, entries[-1], new)
    return _insert(text, top, new)


def _set_in(text: str, body: Block, path: tuple[str, ...], literal: str) -> str:
    name, rest = path[0], path[1:]
    found = [f for f in body.fields if f.name == name]
    if len(found) > 1:
        raise ConfigEditError(f"{name} is set {len(found)} times")
    if not found:
        return _insert(text, body, _render(path, literal))
    (one,) = found
    if not rest:
        if not isinstance(one.value, Scalar):
            raise ConfigEditError(f"{name} holds a message or a list, not a value")
        return text[: one.value.start] + literal + text[one.value.end :]
    if not isinstance(one.value, Block):
        raise ConfigEditError(f"{name} is not a message")
    return _set_in(text, one.value, rest, literal)


def _render(path: tuple[str, ...], literal: str) -> str:
    """`a { b: 1 }` for path (a, b), on lines of their own, indented by two spaces a level."""
    if len(path) == 1:
        return f"{path[0]}: {literal}"
    inner = _render(path[1:], literal).replace("\n", "\n  ")
    return f"{path[0]} {{\n  {inner}\n}}"


def _line_start(text: str, pos: int) -> int:
    return text.rfind("\n", 0, pos) + 1


def _indent_of(text: str, pos: int) -> str:
    start = _line_start(text, pos)
    return text[start : start + len(text[start:pos]) - len(text[start:pos].lstrip())]


def _insert_after(text: str, after: Field, new: str) -> str:
    """`new` after the field `after`: on the same line when something other than a comment
    follows that field there (`{ a: 1 b: 2 }`), else on a line of its own, indented as the
    field's line."""
    newline = text.find("\n", after.end)
    at = len(text) if newline < 0 else newline
    rest = text[after.end : at].strip()
    if rest and not rest.startswith("#"):
        return text[: after.end] + " " + re.sub(r"\s*\n\s*", " ", new) + text[after.end :]
    indent = _indent_of(text, after.start)
    return text[:at] + "\n" + indent + new.replace("\n", "\n" + indent) + text[at:]


def _insert(text: str, body: Block, new: str) -> str:
    """`new` as the last field of `body`."""
    if body.fields:
        return _insert_after(text, body.fields[-1], new)
    if body.start == 0:  # the top level of an empty file, or of comments only
        prefix = "" if not text or text.endswith("\n") else "\n"
        return text + prefix + new + "\n"
    # An empty message `{ }`: the new field on lines of its own inside it.
    outer = _indent_of(text, body.start)
    inner = outer + "  "
    filled = "\n" + inner + new.replace("\n", "\n" + inner) + "\n" + outer
    return text[: body.start] + filled + text[body.end :]
