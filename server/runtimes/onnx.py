"""ONNX Runtime: the CUDA execution provider when a GPU is usable, else the CPU provider."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.runtimes.base import Interface, RuntimeLoadError, Tensors, first_line

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


def _text(array: np.ndarray, name: str) -> np.ndarray:
    """BYTES elements as the str objects onnxruntime's string tensors hold (UTF-8)."""
    try:
        return np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(array)
    except UnicodeDecodeError:
        raise ValueError(
            f"input '{name}': onnxruntime holds strings as UTF-8 text; this BYTES element is not"
        ) from None


def _bytes(array: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda s: s.encode("utf-8") if isinstance(s, str) else s, otypes=[object])(
        array
    )


class OnnxRuntime:
    """One InferenceSession. Host numpy arrays in and out, also on CUDA: correctness first."""

    def __init__(
        self, model_path: Path, device_pref: str, intra_op_threads: int, interface: Interface
    ) -> None:
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
        graph_inputs = {i.name: i.type for i in self._session.get_inputs()}
        graph_outputs = {o.name: o.type for o in self._session.get_outputs()}
        for kind, declared, graph in (
            ("input", interface.inputs, graph_inputs),
            ("output", interface.outputs, graph_outputs),
        ):
            for name, datatype in declared:
                if name not in graph:
                    raise RuntimeLoadError(
                        f"{model_path.name} has no {kind} '{name}' (its {kind}s: "
                        f"{', '.join(graph)})"
                    )
                if graph[name] != datatype.onnx_type:
                    raise RuntimeLoadError(
                        f"{kind} '{name}' is {graph[name]} in {model_path.name}, but the config "
                        f"says TYPE_{'STRING' if datatype.is_bytes else datatype.name}"
                    )
        self._outputs = interface.output_names
        self._texts = {name for name, d in interface.inputs if d.is_bytes}
        self._byte_outputs = {name for name, d in interface.outputs if d.is_bytes}

    def run(self, inputs: Tensors) -> dict[str, np.ndarray]:
        feed = inputs
        if self._texts:
            feed = {n: _text(a, n) if n in self._texts else a for n, a in inputs.items()}
        results = self._session.run(self._outputs, feed)
        answer = dict(zip(self._outputs, results, strict=True))
        for name in self._byte_outputs:
            answer[name] = _bytes(answer[name])
        return answer

    def close(self) -> None:
        # Dropping the last reference frees the session (and its GPU memory).
        self._session = None  # type: ignore[assignment]
