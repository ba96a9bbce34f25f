"""The README's curl examples, run as written against a real server.

The block after the README's marker is a console transcript: `$ COMMAND` lines, each followed
by what it prints. Each command runs in bash (in a folder of its own, with the server's port
for localhost:8000), and what it prints must match what the README shows: the same JSON
structure, names, shapes, datatypes and messages. Numbers that depend on the trained weights
(probabilities) and classification strings match in kind: a number, "probability:index:label".
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from server_process import PROJECT_ROOT, ServerProcess

README = PROJECT_ROOT / "README.md"
MARKER = "<!-- tests/test_readme_http.py runs this block against a real server -->"
CLASSIFICATION = re.compile(r"^[01]\.\d+:\d+:.+$")


def transcript() -> list[tuple[str, list[str]]]:
    """(command, the lines it prints) of the README's block."""
    text = README.read_text()
    assert MARKER in text, "the README lost its curl examples"
    block = text.split(MARKER, 1)[1].split("```console\n", 1)[1].split("```", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def matches(shown: Any, got: Any) -> bool:
    """Whether `got` is what the README shows, up to weight-dependent values."""
    if isinstance(shown, dict):
        return (
            isinstance(got, dict)
            and shown.keys() == got.keys()
            and all(matches(shown[k], got[k]) for k in shown)
        )
    if isinstance(shown, list):
        return (
            isinstance(got, list)
            and len(shown) == len(got)
            and all(matches(a, b) for a, b in zip(shown, got, strict=True))
        )
    if isinstance(shown, float):
        return isinstance(got, float | int)
    if isinstance(shown, str) and CLASSIFICATION.match(shown):
        return isinstance(got, str) and CLASSIFICATION.match(got) is not None
    return bool(shown == got)


def _json_then_rest(line: str) -> tuple[Any, str]:
    """A line holding a JSON document, then maybe more (curl's -w output)."""
    document, end = json.JSONDecoder().raw_decode(line)
    return document, line[end:]


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve(models=["fashion_mnist"])


def test_the_readme_shows_a_few_commands() -> None:
    commands = [command for command, _ in transcript()]
    assert sum(command.startswith("curl ") for command in commands) >= 4


def test_the_readme_commands_print_what_the_readme_shows(
    server: ServerProcess, tmp_path: Path
) -> None:
    """In order, in one folder: a command may use what an earlier one wrote."""
    for command, shown in transcript():
        command = command.replace("localhost:8000", server.http_target)
        done = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, (command, done.stderr)
        printed = done.stdout.splitlines()
        assert len(printed) == len(shown), (command, done.stdout)
        for shown_line, printed_line in zip(shown, printed, strict=True):
            if shown_line.startswith(("{", "[")):
                expected, expected_rest = _json_then_rest(shown_line)
                got, rest = _json_then_rest(printed_line)
                assert matches(expected, got), (command, shown_line, printed_line)
                assert rest == expected_rest, (command, rest)
            else:
                assert printed_line == shown_line, command
