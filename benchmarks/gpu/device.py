"""What the device is, and how busy and full it is while the server runs.

GPU facts come from torch and, when nvidia-ml-py is importable, NVML (the driver's own view:
driver version, memory in use by every process, utilisation). Figures NVML alone gives are
None without it, and the results say so.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import platform
import shutil
import subprocess
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.figures import machine
from benchmarks.gpu.context import Context, Recorder, StepError

CUDA_PROVIDER = "CUDAExecutionProvider"
# (module, distribution) of everything the later steps import, to say where each comes from.
PACKAGES = (
    ("torch", "torch"), ("torchvision", "torchvision"), ("onnxruntime", "onnxruntime"),
    ("onnx", "onnx"), ("onnxscript", "onnxscript"), ("numpy", "numpy"), ("grpc", "grpcio"),
    ("google.protobuf", "protobuf"), ("grpc_health", "grpcio-health-checking"),
    ("grpc_reflection", "grpcio-reflection"), ("aiohttp", "aiohttp"),
    ("prometheus_client", "prometheus-client"), ("PIL", "pillow"), ("tqdm", "tqdm"),
    ("pynvml", "nvidia-ml-py"), ("pygrpc_native", "pygrpc-native"),
)  # fmt: skip
# Needed by no step (imported only when present), so their absence is not a failure.
OPTIONAL = ("pynvml", "pygrpc_native")
UTILISATION_PERIOD_S = 0.1


def package_origins(site: Path) -> dict[str, dict[str, str | None]]:
    """module -> its distribution's version and whether it was carried or found here."""
    found: dict[str, dict[str, str | None]] = {}
    for module, distribution in PACKAGES:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            found[module] = {"version": None, "from": None}
            continue
        try:
            dist = metadata.distribution(distribution)
            where = Path(str(dist.locate_file(""))).resolve()
            origin = "carried" if where == site.resolve() else "this Python"
            found[module] = {"version": dist.version, "from": origin}
        except metadata.PackageNotFoundError:
            found[module] = {"version": "?", "from": "this Python"}
    return found


def onnxruntime_facts() -> dict[str, Any]:
    import onnxruntime as ort

    providers = list(ort.get_available_providers())
    return {"version": ort.__version__, "providers": providers, "cuda": CUDA_PROVIDER in providers}


def torch_facts() -> dict[str, Any]:
    import torch

    available = torch.cuda.is_available()
    facts: dict[str, Any] = {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": available,
        "tf32_matmul": _setting(lambda: torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": _setting(lambda: torch.backends.cudnn.allow_tf32),
    }
    if available:
        facts["cudnn"] = torch.backends.cudnn.version()
        facts["gpus"] = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            facts["gpus"].append(
                {
                    "name": props.name,
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}",
                    "multiprocessors": props.multi_processor_count,
                }
            )
    return facts


def _setting(read: Any) -> bool | None:
    """A torch backend flag, None where this torch no longer has it (its API moves)."""
    try:
        return bool(read())
    except Exception:
        return None


def driver_facts() -> dict[str, Any]:
    """Driver and CUDA driver versions: NVML's, else nvidia-smi's."""
    nvml = _nvml()
    if nvml is not None:
        facts: dict[str, Any] = {
            "source": "nvml",
            "driver": _text(nvml.nvmlSystemGetDriverVersion()),
        }
        with contextlib.suppress(Exception):
            version = nvml.nvmlSystemGetCudaDriverVersion_v2()
            facts["cuda_driver"] = f"{version // 1000}.{version % 1000 // 10}"
        return facts
    if shutil.which("nvidia-smi") is None:
        return {"source": None}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as error:
        return {"source": "nvidia-smi", "error": str(error)}
    return {"source": "nvidia-smi", "driver": out[0] if out else None}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _nvml() -> Any:
    """pynvml, initialised; None without nvidia-ml-py or a driver."""
    try:
        nvml = importlib.import_module("pynvml")
        nvml.nvmlInit()
    except Exception:  # not installed, no driver, no GPU: NVML figures are then unknown
        return None
    return nvml


class GpuMonitor:
    """GPU 0's memory in use and utilisation, through NVML; torch's view of the memory when
    NVML is missing (utilisation is then unknown)."""

    def __init__(self) -> None:
        self._nvml = _nvml()
        self._handle = self._nvml.nvmlDeviceGetHandleByIndex(0) if self._nvml else None
        self.source = "nvml" if self._nvml else "torch (no nvidia-ml-py: utilisation unknown)"

    def memory_used_bytes(self) -> int | None:
        """Memory in use on the device by every process."""
        if self._nvml is not None:
            return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        try:
            import torch

            free, total = torch.cuda.mem_get_info(0)
        except Exception:
            return None
        return int(total - free)

    def utilisation(self) -> float | None:
        if self._nvml is None:
            return None
        return float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[list[float]]:
        """Utilisation (percent) sampled every UTILISATION_PERIOD_S while the block runs."""
        samples: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(UTILISATION_PERIOD_S):
                value = self.utilisation()
                if value is not None:
                    samples.append(value)

        thread = threading.Thread(target=sample, name="gpu-utilisation", daemon=True)
        thread.start()
        try:
            yield samples
        finally:
            stop.set()
            thread.join(1.0)


def resolve(requested: str, cuda_available: bool) -> str:
    """The device the run uses: auto takes CUDA when torch sees it."""
    if requested == "cuda" and not cuda_available:
        raise StepError("--device cuda asked for, but torch sees no usable CUDA device")
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    return requested


def run(context: Context, record: Recorder) -> str:
    record.update(machine=machine(), python=platform.python_version())
    packages = package_origins(Path(context.site))
    record.update(packages=packages)
    missing = [m for m, found in packages.items() if found["version"] is None and m not in OPTIONAL]
    torch = torch_facts()
    ort = onnxruntime_facts()
    record.update(
        torch=torch, onnxruntime=ort, driver=driver_facts() if torch["cuda_available"] else {}
    )
    device = resolve(context.device, torch["cuda_available"])
    onnx_on_device = device == "cpu" or ort["cuda"]
    why_not = (
        ""
        if onnx_on_device
        else f"onnxruntime {ort['version']} has no {CUDA_PROVIDER} (providers: "
        f"{', '.join(ort['providers'])}): ONNX on CUDA is not measured; onnxruntime-gpu is "
        "too large to carry to a machine without a registry"
    )
    record.update(device=device, onnx_on_device=onnx_on_device, onnx_not_measured=why_not)
    if missing:
        raise StepError(f"not importable here, and not carried: {', '.join(missing)}")
    gpus = torch.get("gpus", [])
    where = f"{gpus[0]['name']} ({gpus[0]['memory_gib']} GiB)" if gpus else "the CPU"
    return f"device {device}: {where}; torch {torch['version']}, onnxruntime {ort['version']}" + (
        f"; {why_not.split(':')[0]}" if why_not else ""
    )
