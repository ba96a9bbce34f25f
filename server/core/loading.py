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
from server.runtimes import Interface, Runtime, RuntimeLoadError, create_runtime
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
        shapes = {t.name: (t.model_dims, t.datatype.dtype) for t in spec.signature.outputs}
        batched = spec.signature.batched
        nulls: list[Runtime] = [NullRuntime(shapes, batched) for _ in range(spec.instance_count)]
        return LoadedVersion(nulls, max(spec.max_batch_size, 1))
    interface = runtime_interface(spec)
    runtimes: list[Runtime] = []
    try:
        for _ in range(spec.instance_count):
            _check(cancel)
            threads = spec.intra_op_threads
            runtime = create_runtime(spec.platform, path, spec.device_pref, threads, interface)
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


def runtime_interface(spec: ModelSpec) -> Interface:
    """The config's tensors as a runtime checks and feeds them."""
    return Interface(
        tuple((t.name, t.datatype) for t in spec.signature.inputs),
        tuple((t.name, t.datatype) for t in spec.signature.outputs),
    )


def inline_rows(runtime: Runtime, spec: ModelSpec, cancel: threading.Event) -> int:
    """The largest batch the runtime computes within INLINE_BUDGET_S (0: none does).

    Times batches of 1 and max_batch_size (warmed up already; best of TIMED_RUNS) and
    interpolates between them. Measured once, at load, where nothing else waits for the GIL:
    timings taken while serving would count that wait as compute.
    """
    if sample_inputs(spec, 1) is None:  # inputs that cannot be made up: never inline
        return 0
    largest = max(spec.max_batch_size, 1)
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
    batch = sample_inputs(spec, rows)
    assert batch is not None
    best = float("inf")
    for _ in range(TIMED_RUNS):
        _check(cancel)
        began = time.perf_counter()
        _run(runtime, batch, f"timing at batch {rows}")
        best = min(best, time.perf_counter() - began)
    return best


def sample_inputs(spec: ModelSpec, rows: int) -> dict[str, np.ndarray] | None:
    """Zeros in every required input's shape (variable dims as 1), for warm-up and timing;
    None when an input holds strings, whose meaningful values cannot be made up."""
    signature = spec.signature
    lead = (rows,) if signature.batched else ()
    inputs = {}
    for tensor in signature.inputs:
        if tensor.optional:
            continue
        if tensor.datatype.is_bytes:
            return None
        dims = tuple(1 if d == -1 else d for d in tensor.model_dims)
        inputs[tensor.name] = np.zeros((*lead, *dims), tensor.datatype.dtype)
    return inputs


def warm_up(runtime: Runtime, spec: ModelSpec, cancel: threading.Event) -> None:
    """First runs allocate and optimise; doing them here keeps them out of request latency,
    and checks that the model takes the config's input dims and gives its outputs' dims.
    Models with string inputs are not warmed up (Triton warms up only when told how)."""
    batched = spec.signature.batched
    for rows in sorted({1, spec.max_batch_size}) if batched else [1]:
        _check(cancel)
        inputs = sample_inputs(spec, rows)
        if inputs is None:
            return
        outputs = _run(runtime, inputs, f"warm-up at batch {rows}" if batched else "warm-up")
        for tensor in spec.signature.outputs:
            got = outputs.get(tensor.name) if isinstance(outputs, dict) else None
            shape = getattr(got, "shape", None)
            expected = ((rows,) if batched else ()) + tensor.model_dims
            if (
                shape is None
                or len(shape) != len(expected)
                or any(e not in (-1, s) for e, s in zip(expected, shape, strict=True))
            ):
                where = f" at batch {rows}" if batched else ""
                raise RuntimeLoadError(
                    f"model returns shape {shape} for output {tensor.name!r}{where}; "
                    f"the config expects {tuple(expected)}"
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
    image = spec.image
    if image is None:  # a reference records images in and class scores out
        return
    if not path.is_file():
        log.warning(
            "model %s version %d has no %s; serving without the reference check",
            spec.name, version, REFERENCE_FILE,
        )  # fmt: skip
        return
    try:
        with np.load(path) as data:
            inputs = np.ascontiguousarray(data["inputs"], dtype=image.prep.dtype)
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
    spec_input = spec.signature.input(image.input)
    assert spec_input is not None
    dims = spec_input.dims
    if inputs.ndim != 1 + len(dims) or tuple(inputs.shape[1:]) != dims or len(inputs) < 1:
        raise RuntimeLoadError(
            f"{REFERENCE_FILE} inputs have shape {list(inputs.shape)}, "
            f"expected [N, {', '.join(map(str, dims))}]"
        )
    expected = expected.reshape(len(expected), -1) if expected.ndim > 1 else expected
    if expected.shape != (len(inputs), image.classes):
        raise RuntimeLoadError(
            f"{REFERENCE_FILE} outputs have shape {list(expected.shape)}, "
            f"expected [{len(inputs)}, {image.classes}]"
        )
    batched = spec.signature.batched
    step = spec.max_batch_size if batched else 1
    model_dims = spec_input.model_dims
    for runtime in runtimes:
        _check(cancel)
        parts = []
        for i in range(0, len(inputs), step):
            chunk = inputs[i : i + step]
            if batched:
                fed = chunk.reshape((len(chunk), *model_dims))
            else:
                fed = chunk[0].reshape(model_dims)
            out = _run(runtime, {image.input: fed}, "reference check")[image.output]
            parts.append(np.asarray(out, np.float32).reshape(len(chunk), -1))
        got = np.concatenate(parts)
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


def _run(runtime: Runtime, inputs: dict[str, np.ndarray], step: str) -> dict[str, np.ndarray]:
    try:
        return runtime.run(inputs)
    except Exception as exc:
        raise RuntimeLoadError(f"{step} failed: {first_line(exc)}") from exc
