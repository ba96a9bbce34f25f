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

from server.runtimes.base import RuntimeLoadError, first_line

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


class TorchScriptRuntime:
    def __init__(self, model_path: Path, device_pref: str, intra_op_threads: int) -> None:
        import torch

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

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        if not batch.flags.writeable:  # torch.from_numpy warns on read-only buffers
            batch = batch.copy()
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch))  # zero-copy on the CPU
            if self._device.type != "cpu":
                x = x.to(self._device, non_blocking=True)
            y = self._module(x)
            if isinstance(y, (tuple, list)):
                y = y[0]
            return y.to(dtype=torch.float32).cpu().numpy()

    def close(self) -> None:
        self._module = None
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()
