"""The server's imports point one way: entry points -> app -> api -> processes -> core ->
observability -> config/errors/runtimes/startlines (../shared/DESIGN.md, README's layout).

Every import counts, at module level or inside a function or a TYPE_CHECKING block: a lazy
import that runs back up is still a dependency that runs back up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parent.parent / "server"

# Lower numbers may import higher ones (and their own level), never the other way.
LEVELS = {
    "server.__main__": 0,
    "server.worker": 0,
    "server.healthcheck": 0,
    "server.app": 1,
    "server.api": 2,
    "server.processes": 3,
    "server.core": 4,
    "server.observability": 5,
    "server.config": 6,
    "server.errors": 6,
    "server.runtimes": 6,
    "server.startlines": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def level_of(module: str) -> int | None:
    """The level of the room a module lives in (the longest prefix in LEVELS)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        level = LEVELS.get(".".join(parts[:end]))
        if level is not None:
            return level
    return None


def server_imports(path: Path) -> set[str]:
    """Every server module the file imports, `from server import x` counted as server.x."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "server")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "server":
                found.update(f"server.{a.name}" for a in node.names)
            elif node.module.startswith("server."):
                found.add(node.module)
    return found


MODULES = sorted(SERVER.rglob("*.py"))


def test_every_server_module_has_a_room() -> None:
    homeless = [module_name(p) for p in MODULES if module_name(p) != "server"]
    homeless = [m for m in homeless if level_of(m) is None]
    assert not homeless, f"add these to LEVELS (and DESIGN.md's layout): {homeless}"


def test_the_layout_holds_the_four_rooms() -> None:
    for room in ("api", "core", "processes", "observability"):
        assert (SERVER / room / "__init__.py").is_file(), room


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SERVER.parent)))
def test_no_import_runs_back_up(path: Path) -> None:
    here = module_name(path)
    own = level_of(here)
    if own is None:  # server/__init__.py
        return
    upward = [m for m in sorted(server_imports(path)) if (level_of(m) or own) < own]
    assert not upward, f"{here} (level {own}) imports from a package above it: {upward}"


def test_no_import_circle() -> None:
    graph = {module_name(p): server_imports(p) for p in MODULES}

    def resolve(name: str) -> str | None:
        """`server.api.status` or the package `server.api` as found; None for a name inside one."""
        return name if name in graph else None

    edges = {m: {r for n in deps if (r := resolve(n)) and r != m} for m, deps in graph.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [start])):
            pytest.fail(f"import circle: {' -> '.join(cycle)}")


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The rule would pass vacuously if imports were not found: feed it one that runs up."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from server.app import serve\n    from server import codecs\n")
    assert server_imports(bad) == {"server.app", "server.codecs"}
    assert level_of("server.core.batcher") == 4
    assert level_of("server.app") < level_of("server.core.batcher")
