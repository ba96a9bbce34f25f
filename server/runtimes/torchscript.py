"""TorchScript through torch.jit.load, on CUDA when usable, else CPU.

torch is imported inside the functions: the server imports this module only when a
TorchScript model is loaded, and a server that serves ONNX models never loads torch.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from server.runtimes.base import Interface, RuntimeLoadError, Tensors, first_line

_threads_lock = threading.Lock()
_threads_configured = False


def _configure_threads(torch: Any, intra_op_threads: int) -> None:
    """torch's thread pools belong to the process, not to a model: the first TorchScript
    load sets them (from the server's intra_op_threads) and later loads leave them alone.
    0 keeps torch's default."""
    global _threads_configured
    with _threads_lock:
        if _threads_configured:
            return
        _threads_configured = True
        if intra_op_threads > 0:
            torch.set_num_threads(intra_op_threads)
        # Batches run one at a time per instance; inter-op threads only add contention.
        # torch refuses once it has done parallel work: then its setting stays.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)


def positional(names: list[str]) -> list[str]:
    """Tensors in the order TorchScript takes or gives them: by Triton's `NAME__<index>`
    convention when every name follows it, else in the config's order."""
    indices = [name.rpartition("__")[2] for name in names]
    if all("__" in n and i.isdigit() for n, i in zip(names, indices, strict=True)):
        return [n for _, n in sorted(zip((int(i) for i in indices), names, strict=True))]
    return list(names)


class TorchScriptRuntime:
    def __init__(
        self, model_path: Path, device_pref: str, intra_op_threads: int, interface: Interface
    ) -> None:
        import torch

        for kind, tensors in (("input", interface.inputs), ("output", interface.outputs)):
            for name, datatype in tensors:
                if datatype.is_bytes:
                    raise RuntimeLoadError(
                        f"{kind} '{name}' is TYPE_STRING: TorchScript models take and give "
                        "tensors of numbers only"
                    )
        self._inputs = positional([name for name, _ in interface.inputs])
        self._outputs = positional(interface.output_names)
        self._dtypes = {name: d.dtype for name, d in interface.outputs}

        use_cuda = device_pref != "cpu" and torch.cuda.is_available()
        if device_pref == "cuda" and not use_cuda:
            raise RuntimeLoadError("device cuda requested but torch sees no usable CUDA device")
        _configure_threads(torch, intra_op_threads)
        self._torch = torch
        self._device = torch.device("cuda:0" if use_cuda else "cpu")
        self.device = str(self._device)
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated upstream in favour of torch.export; loading still
                # works and is what the pytorch_libtorch platform means.
                warnings.filterwarnings(
                    "ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning
                )
                module = torch.jit.load(str(model_path), map_location=self._device)
        except Exception as exc:  # torch raises RuntimeError/ValueError variants for bad files
            message = f"torch cannot load {model_path.name}: {first_line(exc)}"
            raise RuntimeLoadError(message) from exc
        module.eval()
        self._module = module

    def run(self, inputs: Tensors) -> dict[str, np.ndarray]:
        torch = self._torch
        args = []
        with torch.inference_mode():
            for name in self._inputs:
                array = inputs.get(name)
                if array is None:  # an optional input left out: the model's default
                    continue
                if not array.flags.writeable:  # torch.from_numpy warns on read-only buffers
                    array = array.copy()
                x = torch.from_numpy(np.ascontiguousarray(array))  # zero-copy on the CPU
                if self._device.type != "cpu":
                    x = x.to(self._device, non_blocking=True)
                args.append(x)
            y = self._module(*args)
            results = list(y) if isinstance(y, (tuple, list)) else [y]
            if len(results) < len(self._outputs):
                raise ValueError(
                    f"the model returned {len(results)} tensors, the config names "
                    f"{len(self._outputs)} outputs"
                )
            return {
                name: result.cpu().numpy().astype(self._dtypes[name], copy=False)
                for name, result in zip(self._outputs, results, strict=False)
            }

    def close(self) -> None:
        self._module = None
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()
