"""A Python laid out like the GPU machine's, built from this environment's packages.

The GPU machine's Python has torch, torchvision, onnxruntime, onnx, numpy, grpcio, protobuf,
aiohttp, prometheus-client, pillow, nvidia-ml-py and pytest, and nothing else a registry would
bring. machine_like_python() makes a venv without pip or system packages whose site-packages
holds links to exactly those distributions here and what they require (resolved from their
metadata), so a command run with it finds missing what the GPU machine misses: tritonclient,
grpcio-health-checking, grpcio-reflection, opentelemetry, tqdm, onnxscript.

What it cannot imitate: the versions (3.11 here, 3.12 there; this environment's pins) and a
GPU; nvidia-ml-py is linked only when installed here.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

GPU_MACHINE_HAS = (
    "torch", "torchvision", "onnxruntime", "onnx", "numpy", "grpcio", "protobuf", "aiohttp",
    "prometheus-client", "pillow", "nvidia-ml-py", "pytest",
)  # fmt: skip
# Carried to it by `make gpu-wheels`, or never needed there: must be missing from the layout.
NOT_ON_THE_MACHINE = (
    "tritonclient", "grpc_health", "grpc_reflection", "opentelemetry", "tqdm", "onnxscript",
    "onnx_ir",
)  # fmt: skip


def closure(roots: tuple[str, ...]) -> dict[str, metadata.Distribution]:
    """The installed distributions `roots` name and everything they require (extras followed,
    markers evaluated for this interpreter); roots not installed here are left out."""
    environment = default_environment()
    found: dict[str, metadata.Distribution] = {}
    pending = [(name, frozenset[str]()) for name in roots]
    while pending:
        name, extras = pending.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        key = canonicalize_name(dist.metadata["Name"])
        if key in found and not extras:
            continue
        found[key] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            marker = requirement.marker
            wanted = [{**environment, "extra": extra} for extra in ("", *extras)]
            if marker is None or any(marker.evaluate(env) for env in wanted):
                pending.append((requirement.name, frozenset(requirement.extras)))
    return found


def machine_like_python(folder: Path) -> Path:
    """A Python at folder/bin/python with only the GPU machine's packages on its path."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    here = Path(sysconfig.get_paths()["purelib"])
    for dist in closure(GPU_MACHINE_HAS).values():
        for entry in {_entry(here, Path(str(f))) for f in dist.files or []}:
            source, target = here / entry, site / entry
            if entry.parts[0] in ("..", "__pycache__") or not source.exists() or target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source, target_is_directory=source.is_dir())
    return python


def _entry(site: Path, file: Path) -> Path:
    """What to link for one installed file: its top-level folder or file, or inside a namespace
    folder shared by several distributions (google/, nvidia/) its second-level one."""
    top = Path(file.parts[0])
    if top.suffix in (".dist-info", ".libs") or not (site / top).is_dir():
        return top
    namespace = not (site / top / "__init__.py").exists()
    return Path(*file.parts[:2]) if namespace and len(file.parts) > 1 else top
