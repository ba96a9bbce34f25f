"""Print pip requirement lines from pyproject.toml, so the image builds install the pins the
project declares (one source of truth) in a layer of their own, before the source is copied.

    python requirements.py pyproject.toml                           # the server's dependencies
    python requirements.py --extra gpu --without onnxruntime pyproject.toml
    python requirements.py --extra dev --only grpcio-tools pyproject.toml

Standard library only: it runs in a bare python image.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_name(line: str) -> str:
    """The normalised distribution name of a requirement line ("tritonclient[grpc]==2" -> ...)."""
    match = _NAME.match(line)
    if match is None:
        raise ValueError(f"not a requirement: {line!r}")
    return re.sub(r"[-_.]+", "-", match[1]).lower()


def requirements(
    pyproject: Path,
    extras: Sequence[str] = (),
    without: Sequence[str] = (),
    only: Sequence[str] = (),
) -> list[str]:
    """The core dependencies plus `extras`, minus `without`; just `only` when given."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise ValueError(f"no such extra in {pyproject}: {', '.join(unknown)}")
    lines = list(project["dependencies"])
    for extra in extras:
        lines += optional[extra]
    dropped = {requirement_name(name) for name in without}
    wanted = {requirement_name(name) for name in only}
    picked = [
        line
        for line in lines
        if requirement_name(line) not in dropped
        and (not wanted or requirement_name(line) in wanted)
    ]
    missing = wanted - {requirement_name(line) for line in picked}
    if missing:
        raise ValueError(f"not declared in {pyproject}: {', '.join(sorted(missing))}")
    return list(dict.fromkeys(picked))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extra", action="append", default=[], help="add an extra's pins")
    parser.add_argument("--without", action="append", default=[], help="leave a package out")
    parser.add_argument("--only", action="append", default=[], help="print only these packages")
    args = parser.parse_args(argv)
    try:
        lines = requirements(args.pyproject, args.extra, args.without, args.only)
    except ValueError as exc:
        parser.error(str(exc))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
