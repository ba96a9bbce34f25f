"""Runtimes that execute exported classifiers, chosen by the config's platform.

The runtime modules are imported on demand: the server core never imports torch
unless a TorchScript model is actually loaded.
"""

from __future__ import annotations

from pathlib import Path

from modelrepo.layout import PLATFORM_ONNX, PLATFORM_TORCHSCRIPT
from server.runtimes.base import OWN_EXPORT, Interface, Runtime, RuntimeLoadError

DEVICE_PREFERENCES = ("auto", "cpu", "cuda")

__all__ = ["DEVICE_PREFERENCES", "Interface", "Runtime", "RuntimeLoadError", "create_runtime"]


def create_runtime(
    platform: str,
    model_path: Path,
    device_pref: str = "auto",
    intra_op_threads: int = 0,
    interface: Interface = OWN_EXPORT,
) -> Runtime:
    """Load `model_path` for `platform` ("onnxruntime_onnx" | "pytorch_libtorch").

    device_pref "auto" uses a GPU when the runtime can reach one, "cpu" never does, and
    "cuda" fails with RuntimeLoadError when no GPU is usable. intra_op_threads 0 keeps
    the runtime's own default.
    """
    if device_pref not in DEVICE_PREFERENCES:
        raise RuntimeLoadError(
            f"unknown device {device_pref!r} (expected one of {', '.join(DEVICE_PREFERENCES)})"
        )
    if intra_op_threads < 0:
        raise RuntimeLoadError(f"intra_op_threads cannot be negative (got {intra_op_threads})")
    if not Path(model_path).is_file():
        raise RuntimeLoadError(f"model file {model_path} not found")
    if platform == PLATFORM_ONNX:
        from server.runtimes.onnx import OnnxRuntime

        return OnnxRuntime(Path(model_path), device_pref, intra_op_threads, interface)
    if platform == PLATFORM_TORCHSCRIPT:
        from server.runtimes.torchscript import TorchScriptRuntime

        return TorchScriptRuntime(Path(model_path), device_pref, intra_op_threads, interface)
    raise RuntimeLoadError(
        f"unsupported platform {platform!r} (expected {PLATFORM_ONNX} or {PLATFORM_TORCHSCRIPT})"
    )
