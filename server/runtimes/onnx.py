"""ONNX Runtime: the CUDA execution provider when a GPU is usable, else the CPU provider."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelrepo.layout import INPUT_NAME, OUTPUT_NAME
from server.runtimes.base import RuntimeLoadError, first_line

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def cuda_usable() -> bool:
    """True when this onnxruntime build ships the CUDA provider (onnxruntime-gpu)."""
    return CUDA_PROVIDER in ort.get_available_providers()


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """Options for serving, not for benchmarks of one model alone.

    Spinning intra-op threads keep cores busy between batches and starve the event loop
    that feeds them, so spinning is off; batches run one at a time per instance, so
    inter-op parallelism would only add threads.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only; warnings about fallbacks are re-logged by us
    return options


class OnnxRuntime:
    """One InferenceSession. Host numpy arrays in and out, also on CUDA: correctness first."""

    def __init__(self, model_path: Path, device_pref: str, intra_op_threads: int) -> None:
        use_cuda = device_pref != "cpu" and cuda_usable()
        if device_pref == "cuda" and not use_cuda:
            raise RuntimeLoadError(
                "device cuda requested but onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(ort.get_available_providers())}; install onnxruntime-gpu)"
            )
        providers: list[str | tuple[str, dict[str, str]]] = [CPU_PROVIDER]
        if use_cuda:
            providers.insert(0, (CUDA_PROVIDER, {"device_id": "0"}))
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=session_options(intra_op_threads), providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            message = f"onnxruntime cannot load {model_path.name}: {first_line(exc)}"
            raise RuntimeLoadError(message) from exc
        active = self._session.get_providers()
        if use_cuda and CUDA_PROVIDER not in active:
            # The provider exists but could not start (driver or CUDA libraries missing).
            if device_pref == "cuda":
                raise RuntimeLoadError(
                    "device cuda requested but the CUDA execution provider failed to start"
                )
            log.warning("%s: CUDA execution provider failed to start; using CPU", model_path)
        self.device = "cuda:0" if CUDA_PROVIDER in active else "cpu"
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if inputs != [INPUT_NAME]:
            raise RuntimeLoadError(
                f"{model_path.name} has inputs {inputs}, expected one named {INPUT_NAME!r}"
            )
        if OUTPUT_NAME not in outputs:
            raise RuntimeLoadError(
                f"{model_path.name} has outputs {outputs}, expected one named {OUTPUT_NAME!r}"
            )
        self._outputs = [OUTPUT_NAME]

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(self._outputs, {INPUT_NAME: batch})[0]

    def close(self) -> None:
        # Dropping the last reference frees the session (and its GPU memory).
        self._session = None  # type: ignore[assignment]
