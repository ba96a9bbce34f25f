"""The checks a model version passes before it serves, run in a worker thread.

A version serves only after each runtime instance is created, warmed up (batch 1 and
max_batch_size) and agrees with the version's reference.npz. These steps block, so the
manager runs them off the event loop; a thread cannot be interrupted, so shutdown sets
`cancel` and the steps check it between instances and between runs: a stopping server
waits for the step in progress, never for the rest of a long load.
"""

from __future__ import annotations

import logging
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelrepo.layout import REFERENCE_FILE, SYNTHETIC_DATASET
from modelrepo.precision import FP16, FP32, REFERENCE_PRECISION_KEY, REFERENCE_TOLERANCE_KEY
from server.config import Settings
from server.core.repository import ModelSpec
from server.runtimes import Runtime, RuntimeLoadError, create_runtime
from server.runtimes.base import first_line
from server.runtimes.null import NullRuntime

log = logging.getLogger(__name__)

SYNTHETIC_WARNING = "trained on SYNTHETIC data: predictions are meaningless for real images"
# A batch predicted to compute within this runs on the event loop's thread (server.core.batcher).
INLINE_BUDGET_S = 0.0005
# Timed runs per batch size for that prediction (the fastest counts: others were disturbed).
TIMED_RUNS = 3


@dataclass(frozen=True)
class LoadedVersion:
    runtimes: list[Runtime]
    # Batches of at most this many rows run inline (0: none); see inline_rows().
    inline_rows: int


class LoadCancelled(Exception):
    """Shutdown began while the version was loading; nothing of it was kept."""


def prepare_version(
    spec: ModelSpec, version: int, settings: Settings, cancel: threading.Event
) -> LoadedVersion:
    """Create the version's runtime instances, warm each up, check them against reference,
    and time the first to choose which batches run inline.

    Raises RuntimeLoadError (the reason the version cannot serve) or LoadCancelled; either
    way every runtime created so far is closed.
    """
    path = spec.model_path(version)
    if not path.is_file():
        raise RuntimeLoadError(f"model file {spec.shown(path)} not found")
    if settings.null_compute:  # benchmarking: nothing to warm up, nothing to check
        nulls: list[Runtime] = [NullRuntime(spec.num_classes) for _ in range(spec.instance_count)]
        return LoadedVersion(nulls, spec.max_batch_size)
    runtimes: list[Runtime] = []
    try:
        for _ in range(spec.instance_count):
            _check(cancel)
            threads = spec.intra_op_threads
            runtime = create_runtime(spec.platform, path, spec.device_pref, threads)
            runtimes.append(runtime)
            warm_up(runtime, spec, cancel)
        if spec.precision == FP16 and runtimes[0].device == "cpu":
            log.warning(
                "model %s version %d is fp16, made for GPU runtimes: on the CPU it computes no "
                "faster than fp32 (onnxruntime casts to float32; torch's half kernels are slower)",
                spec.name, version,
            )  # fmt: skip
        check_reference(runtimes, spec, version, settings.reference_tolerance, cancel)
        inline = inline_rows(runtimes[0], spec, cancel)
    except BaseException:
        for runtime in runtimes:
            runtime.close()
        raise
    return LoadedVersion(runtimes, inline)


def inline_rows(runtime: Runtime, spec: ModelSpec, cancel: threading.Event) -> int:
    """The largest batch the runtime computes within INLINE_BUDGET_S (0: none does).

    Times batches of 1 and max_batch_size (warmed up already; best of TIMED_RUNS) and
    interpolates between them. Measured once, at load, where nothing else waits for the GIL:
    timings taken while serving would count that wait as compute.
    """
    largest = spec.max_batch_size
    one = _best_time(runtime, 1, spec, cancel)
    if one > INLINE_BUDGET_S:
        return 0
    if largest == 1:
        return 1
    full = _best_time(runtime, largest, spec, cancel)
    per_row = max(full - one, 0.0) / (largest - 1)
    if per_row == 0:
        return largest
    return min(largest, 1 + int((INLINE_BUDGET_S - one) / per_row))


def _best_time(runtime: Runtime, rows: int, spec: ModelSpec, cancel: threading.Event) -> float:
    batch = np.zeros((rows, *spec.input_shape), np.float32)
    best = float("inf")
    for _ in range(TIMED_RUNS):
        _check(cancel)
        began = time.perf_counter()
        _run(runtime, batch, f"timing at batch {rows}")
        best = min(best, time.perf_counter() - began)
    return best


def warm_up(runtime: Runtime, spec: ModelSpec, cancel: threading.Event) -> None:
    """First runs allocate and optimise; doing them here keeps them out of request latency,
    and checks that the model takes the config's input dims and returns its classes."""
    for rows in sorted({1, spec.max_batch_size}):
        _check(cancel)
        zeros = np.zeros((rows, *spec.input_shape), np.float32)
        output = _run(runtime, zeros, f"warm-up at batch {rows}")
        expected = (rows, spec.num_classes)
        if not isinstance(output, np.ndarray) or output.shape != expected:
            shape = getattr(output, "shape", type(output).__name__)
            raise RuntimeLoadError(
                f"model returns shape {shape} at batch {rows}; the config expects {expected}"
            )


def check_reference(
    runtimes: list[Runtime],
    spec: ModelSpec,
    version: int,
    tolerance: float,
    cancel: threading.Event,
) -> None:
    """Every instance must reproduce the outputs export recorded for the same inputs.

    A reduced-precision export records its precision, which must be the config's, and the
    tolerance its outputs need; the larger of that and the server's `tolerance` applies.
    """
    path = spec.reference_path(version)
    if not path.is_file():
        log.warning(
            "model %s version %d has no %s; serving without the reference check",
            spec.name, version, REFERENCE_FILE,
        )  # fmt: skip
        return
    try:
        with np.load(path) as data:
            inputs = np.ascontiguousarray(data["inputs"], dtype=np.float32)
            expected = np.asarray(data["outputs"], dtype=np.float32)
            recorded = (
                str(data[REFERENCE_PRECISION_KEY])
                if REFERENCE_PRECISION_KEY in data.files
                else FP32
            )
            own = (
                float(data[REFERENCE_TOLERANCE_KEY])
                if REFERENCE_TOLERANCE_KEY in data.files
                else 0.0
            )
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as exc:
        raise RuntimeLoadError(f"cannot read {REFERENCE_FILE}: {first_line(exc)}") from None
    if not 0.0 <= own < 1.0:  # probabilities: a tolerance of 1 would check nothing
        raise RuntimeLoadError(f"{REFERENCE_FILE} records an unusable tolerance {own:g}")
    tolerance = max(tolerance, own)
    if recorded != spec.precision:
        raise RuntimeLoadError(
            f"{REFERENCE_FILE} was exported at {recorded}, but config.pbtxt says {spec.precision}"
        )
    if inputs.ndim != 4 or tuple(inputs.shape[1:]) != spec.input_shape or len(inputs) < 1:
        raise RuntimeLoadError(
            f"{REFERENCE_FILE} inputs have shape {list(inputs.shape)}, "
            f"expected [N, {', '.join(map(str, spec.input_shape))}]"
        )
    if expected.shape != (len(inputs), spec.num_classes):
        raise RuntimeLoadError(
            f"{REFERENCE_FILE} outputs have shape {list(expected.shape)}, "
            f"expected [{len(inputs)}, {spec.num_classes}]"
        )
    step = spec.max_batch_size
    for runtime in runtimes:
        _check(cancel)
        got = np.concatenate(
            [
                _run(runtime, inputs[i : i + step], "reference check")
                for i in range(0, len(inputs), step)
            ]
        )
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= tolerance:  # also catches NaN
            raise RuntimeLoadError(
                f"reference check failed: max abs diff {diff:.3g} > {tolerance:g}"
            )


def is_synthetic(spec: ModelSpec) -> bool:
    """Whether export recorded that the model learned from generated, not real, images."""
    return spec.training_dataset == SYNTHETIC_DATASET


def hide_paths(text: str, repository: Path) -> str:
    """`text` with the repository's location removed: runtimes name the files they fail on by
    full path, and reasons go to clients, who must not learn the server's file system."""
    roots = {str(repository), str(repository.resolve())}
    for root in sorted(roots, key=len, reverse=True):
        text = text.replace(root.rstrip("/") + "/", "")
    return text


def _check(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise LoadCancelled("the server is shutting down")


def _run(runtime: Runtime, batch: np.ndarray, step: str) -> np.ndarray:
    try:
        return runtime.run(batch)
    except Exception as exc:
        raise RuntimeLoadError(f"{step} failed: {first_line(exc)}") from exc
