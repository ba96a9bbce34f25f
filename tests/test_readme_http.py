"""The curl examples of the README and of docs/*.md, run as written against a real server.

Each block after the marker is a console transcript: `$ COMMAND` lines, each followed by what
it prints. A document's commands run in bash, in order, in a folder of its own (a command may
use what an earlier one wrote), with the server's port for localhost:8000, and what each
prints must match what the document shows: the same JSON structure, names, shapes, datatypes
and messages. Numbers that depend on the trained weights (probabilities) and classification
strings match in kind: a number, "probability:index:label".
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
# The README and every page of docs/ that holds a marked block.
DOCUMENTS = [README, *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
WITH_EXAMPLES = [path for path in DOCUMENTS if MARKER in path.read_text()]
# Documents whose examples must not go missing: the tour's and the protocol reference's.
MUST_HAVE_EXAMPLES = [README, PROJECT_ROOT / "docs" / "serving.md"]


def transcript(document: Path) -> list[tuple[str, list[str]]]:
    """(command, the lines it prints) of the document's marked blocks, in order."""
    text = document.read_text()
    assert MARKER in text, f"{document.name} lost its curl examples"
    steps: list[tuple[str, list[str]]] = []
    for after in text.split(MARKER)[1:]:
        block = after.split("```console\n", 1)[1].split("```", 1)[0]
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                steps[-1][1].append(line)
    return steps


def _name(path: Path) -> str:
    return str(path.relative_to(PROJECT_ROOT))


def matches(shown: Any, got: Any) -> bool:
    """Whether `got` is what the document shows, up to weight-dependent values."""
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


@pytest.mark.parametrize("document", MUST_HAVE_EXAMPLES, ids=_name)
def test_the_tour_and_the_protocol_reference_keep_their_examples(document: Path) -> None:
    assert document in WITH_EXAMPLES, f"{_name(document)} lost its curl examples"


@pytest.mark.parametrize("document", WITH_EXAMPLES, ids=_name)
def test_each_document_shows_a_few_commands(document: Path) -> None:
    commands = [command for command, _ in transcript(document)]
    assert sum(command.startswith("curl ") for command in commands) >= 4


@pytest.mark.parametrize("document", WITH_EXAMPLES, ids=_name)
def test_the_commands_print_what_the_document_shows(
    document: Path, server: ServerProcess, tmp_path: Path
) -> None:
    """In order, in one folder: a command may use what an earlier one wrote."""
    for command, shown in transcript(document):
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
