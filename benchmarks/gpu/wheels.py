"""The Python packages a GPU machine lacks, carried to it as wheels.

The machine has Python 3.12 with torch, torchvision, onnxruntime (a CPU build), onnx, numpy,
grpcio, protobuf, aiohttp, prometheus-client, pillow, nvidia-ml-py and pytest, and reaches no
package registry. `make gpu-wheels` downloads the rest here: `requirements` names them, pinned
as pyproject.toml (or else this environment) pins them; `check` vets a downloaded folder (tags
that fit that machine, total size). There, `install` unpacks the wheels whose distribution the
running Python lacks, or has in an older version, into a private folder that the GPU check puts
first on the path of every process it starts. Unpacking is all that installing these wheels
takes (none needs its scripts or headers), so the machine's own pip is not relied on.

  python -m benchmarks.gpu.wheels requirements
  python -m benchmarks.gpu.wheels check gpu-wheels --python-version 3.12
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tomllib
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
# What the GPU machine has installed: never carried.
ON_THE_MACHINE = frozenset(
    {
        "torch", "torchvision", "onnxruntime", "onnx", "numpy", "aiohttp", "prometheus-client",
        "pillow", "nvidia-ml-py", "pytest",
    }
)  # fmt: skip
# Imported only when asked for (tracing turned on, plots drawn): not on the GPU check's path.
NOT_ON_THE_PATH = ("opentelemetry-", "matplotlib")
# Needed by carried packages and not declared by the project: onnxscript's own (ml-dtypes is
# onnx's too, so it is installed there only where that onnx predates it).
NEEDED_BY_CARRIED = ("onnx-ir", "ml-dtypes")
# The working tree travels within 64 MiB: the wheels must leave room for the rest.
MAX_TOTAL_BYTES = 60 * 2**20
# torch's own Linux wheels need glibc 2.28, so the machine has at least that.
MAX_GLIBC = (2, 28)
_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def normalize(name: str) -> str:
    """A distribution's name as indexes compare it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def declared(pyproject: Path = PYPROJECT) -> list[str]:
    """The server's dependencies and the training extra's, as pyproject.toml writes them."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return [*project["dependencies"], *project.get("optional-dependencies", {}).get("train", [])]


def _name_and_pin(spec: str) -> tuple[str, str | None]:
    """("name", "1.2.3") for "name==1.2.3"; ("name", None) when the version is not pinned."""
    found = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?", spec)
    if found is None:
        raise ValueError(f"not a requirement: {spec!r}")
    pin = re.fullmatch(r"\s*==\s*([^\s,;=<>!~]+)\s*", spec[found.end() :].split(";")[0])
    return found[1], pin[1] if pin else None


def requirements(
    specs: Iterable[str], version_here: Callable[[str], str | None] = installed_version
) -> list[str]:
    """The carried packages, each pinned: to pyproject's `==` version, else to the one this
    environment tests with (unpinned when it has none)."""
    carried: dict[str, str] = {}
    for spec in [*specs, *NEEDED_BY_CARRIED]:
        name, pin = _name_and_pin(spec)
        key = normalize(name)
        if key in ON_THE_MACHINE or key.startswith(NOT_ON_THE_PATH) or key in carried:
            continue
        version = pin or version_here(name)
        carried[key] = f"{name}=={version}" if version else name
    return list(carried.values())


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # normalized
    version: str
    pythons: tuple[str, ...]
    abis: tuple[str, ...]
    platforms: tuple[str, ...]


def parse_wheel(path: Path) -> Wheel:
    """The name, version and tags of a wheel file (NAME-VER[-BUILD]-PY-ABI-PLATFORM.whl)."""
    parts = path.name.removesuffix(".whl").split("-")
    if not path.name.endswith(".whl") or len(parts) not in (5, 6):
        raise ValueError(f"{path.name} is not a wheel file name")
    py, abi, platform = (tuple(tag.split(".")) for tag in parts[-3:])
    return Wheel(path, normalize(parts[0]), parts[1], py, abi, platform)


def _platform_fits(tag: str) -> bool:
    if tag == "any":
        return True
    legacy = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_x86_64", tag)
    if legacy:
        return _LEGACY_MANYLINUX[legacy[1]] <= MAX_GLIBC
    modern = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", tag)
    return bool(modern) and (int(modern[1]), int(modern[2])) <= MAX_GLIBC


def _interpreter_fits(py: str, abi: str, python: tuple[int, int]) -> bool:
    major, minor = python
    cp = f"cp{major}{minor}"
    if abi == "none":
        return py in (f"py{major}", f"py{major}{minor}", cp)
    if abi == "abi3":
        found = re.fullmatch(rf"cp{major}(\d+)", py)
        return bool(found) and int(found[1]) <= minor
    return abi == cp and py == cp


def unfit(wheel: Wheel, python: tuple[int, int]) -> str | None:
    """Why the wheel cannot install on CPython `python` on manylinux x86-64; None if it can."""
    if not any(_interpreter_fits(p, a, python) for p in wheel.pythons for a in wheel.abis):
        return (
            f"built for {'.'.join(wheel.pythons)}-{'.'.join(wheel.abis)}, "
            f"not CPython {python[0]}.{python[1]}"
        )
    if not any(_platform_fits(p) for p in wheel.platforms):
        glibc = ".".join(map(str, MAX_GLIBC))
        return f"built for {'.'.join(wheel.platforms)}, not manylinux x86-64 with glibc {glibc}"
    return None


def wheels_in(folder: Path) -> list[Wheel]:
    return [parse_wheel(path) for path in sorted(folder.glob("*.whl"))]


def check(folder: Path, python: tuple[int, int], wanted: Sequence[str] = ()) -> list[str]:
    """What is wrong with a downloaded folder for that machine (nothing: an empty list)."""
    if not folder.is_dir():
        return [f"{folder} is not a folder (run `make gpu-wheels`)"]
    found = wheels_in(folder)
    if not found:
        return [f"{folder} holds no wheels"]
    problems = [f"{w.path.name}: {why}" for w in found if (why := unfit(w, python))]
    names = [w.name for w in found]
    problems += [
        f"more than one wheel of {n}" for n in sorted({n for n in names if names.count(n) > 1})
    ]
    missing = sorted({normalize(_name_and_pin(spec)[0]) for spec in wanted} - set(names))
    problems += [f"no wheel of {name}" for name in missing]
    total = sum(w.path.stat().st_size for w in found)
    if total > MAX_TOTAL_BYTES:
        problems.append(f"{total / 2**20:.1f} MiB in all, over {MAX_TOTAL_BYTES / 2**20:.0f} MiB")
    return problems


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version ("2.11.0+cu130" -> (2, 11, 0)), enough to order the
    versions these packages publish."""
    head = re.match(r"[\d.]*\d", version.split("+")[0])
    return tuple(int(part) for part in head[0].split(".")) if head else ()


def unpack(wheel: Path, target: Path) -> None:
    """Install a wheel by unpacking it: its .data purelib/platlib go beside the rest; its
    scripts, headers and data files are left out (nothing here runs or builds against them)."""
    root = target.resolve()
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            parts = PurePosixPath(member.filename).parts
            if parts and parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            destination = root.joinpath(*parts)
            if root not in destination.resolve().parents:
                raise ValueError(f"{wheel.name}: {member.filename} points outside the folder")
            if member.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, destination.open("wb") as out:
                shutil.copyfileobj(source, out)
            mode = member.external_attr >> 16
            if mode & 0o777:
                destination.chmod(mode & 0o777)


def install(
    folder: Path,
    target: Path,
    python: tuple[int, int] | None = None,
    version_here: Callable[[str], str | None] = installed_version,
) -> list[dict[str, str]]:
    """Unpack into `target` each wheel whose distribution this Python lacks or has older;
    one row per wheel saying what was done and why."""
    python = python or (sys.version_info.major, sys.version_info.minor)
    target.mkdir(parents=True, exist_ok=True)
    rows = []
    for wheel in wheels_in(folder):
        row = {"package": wheel.name, "carried": wheel.version}
        have = version_here(wheel.name)
        if why := unfit(wheel, python):
            row |= {"action": "skipped", "why": why}
        elif have is not None and _release(have) >= _release(wheel.version):
            row |= {"action": "kept", "why": f"this Python has {have}"}
        else:
            unpack(wheel.path, target)
            why = "missing here" if have is None else f"this Python has the older {have}"
            row |= {"action": "installed", "why": why}
        rows.append(row)
    return rows


def _python_version(text: str) -> tuple[int, int]:
    found = re.fullmatch(r"(\d+)\.(\d+)", text)
    if found is None:
        raise argparse.ArgumentTypeError(f"expected MAJOR.MINOR, got {text!r}")
    return int(found[1]), int(found[2])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu.wheels", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("requirements", help="the carried packages, pinned, one a line")
    checking = commands.add_parser("check", help="a downloaded folder's tags, names and size")
    checking.add_argument("folder", type=Path)
    checking.add_argument("--python-version", type=_python_version, default=(3, 12))
    args = parser.parse_args(argv)
    wanted = requirements(declared())
    if args.command == "requirements":
        print("\n".join(wanted))
        return 0
    problems = check(args.folder, args.python_version, wanted)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        total = sum(w.path.stat().st_size for w in wheels_in(args.folder)) / 2**20
        print(f"{args.folder}: {len(wanted)} wheels, {total:.1f} MiB, fit for the GPU machine")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())


def run(context: Any, record: Any) -> str:
    """The GPU check's first step: unpack the carried wheels this Python needs."""
    folder, site = Path(context.wheels), Path(context.site)
    record.update(folder=str(folder), site=str(site))
    if not folder.is_dir() or not any(folder.glob("*.whl")):
        record.update(wheels=[])
        return f"no carried wheels in {folder}: this Python's own packages are used as they are"
    rows = install(folder, site)
    record.update(wheels=rows)
    done = {
        action: [row["package"] for row in rows if row["action"] == action]
        for action in ("installed", "kept", "skipped")
    }
    for row in rows:
        record.progress(f"{row['package']} {row['carried']}: {row['action']} ({row['why']})")
    return "; ".join(f"{action} {', '.join(names)}" for action, names in done.items() if names)
