"""Each exported file run alone on the device, in this process: the compute the served figures
are read against. torch and onnxruntime are called directly (not through the server's runtimes),
the way the server's runtimes call them: host arrays in and out, so on a GPU the copies count,
one intra-op thread on the CPU as the server's default."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.gpu.context import Context, Recorder, StepError
from benchmarks.gpu.repository import TORCHSCRIPT, models_on_device

BATCHES = (1, 8, 64)
SECONDS_PER_BATCH = {False: 1.0, True: 0.1}
MIN_RUNS = 5
CUDA_PROVIDER = "CUDAExecutionProvider"

Runner = Callable[[np.ndarray], np.ndarray]


def model_file(repository: Path, name: str, runtime: str) -> Path:
    from modelrepo import layout

    file = layout.TORCHSCRIPT_FILE if runtime == TORCHSCRIPT else layout.ONNX_FILE
    return repository / name / "1" / file


def load_runner(path: Path, runtime: str, device: str) -> Runner:
    """float32 images -> the file's float32 probabilities, computed on `device`."""
    if runtime == TORCHSCRIPT:
        import torch

        if device == "cpu":
            torch.set_num_threads(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
            module = torch.jit.load(str(path), map_location=device).eval()

        def run_torch(images: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(images).to(device)).float().cpu().numpy()

        return run_torch
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    providers = ([CUDA_PROVIDER] if device == "cuda" else []) + ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    if device == "cuda" and CUDA_PROVIDER not in session.get_providers():
        raise StepError(f"{path.name}: onnxruntime's {CUDA_PROVIDER} did not start")
    return lambda images: session.run(["probabilities"], {"input": images})[0]


def time_batches(run: Runner, shape: tuple[int, ...], seconds: float) -> list[dict[str, Any]]:
    """images/s, p50 and p99 of one batch at each size; the first run of each is not timed."""
    rng = np.random.default_rng(0)
    rows = []
    for size in BATCHES:
        batch = rng.random((size, *shape), dtype=np.float32)
        run(batch)
        times: list[float] = []
        end = time.perf_counter() + seconds
        while len(times) < MIN_RUNS or time.perf_counter() < end:
            began = time.perf_counter()
            run(batch)
            times.append(time.perf_counter() - began)
        ms = np.asarray(times) * 1000
        rows.append(
            {
                "batch": size,
                "images_per_s": round(size * len(times) / (sum(times) or 1e-9), 1),
                "p50_ms": round(float(np.percentile(ms, 50)), 4),
                "p99_ms": round(float(np.percentile(ms, 99)), 4),
                "runs": len(times),
            }
        )
    return rows


def run(context: Context, record: Recorder) -> str:
    from modelrepo import layout

    models = models_on_device(context)
    seconds = SECONDS_PER_BATCH[context.quick]
    rows: list[dict[str, Any]] = []
    skipped = []
    for name, model in models.items():
        if record.time_left() < len(BATCHES) * (seconds + 1):
            skipped.append(name)
            continue
        path = model_file(context.repository, name, model["runtime"])
        with np.load(path.parent / layout.REFERENCE_FILE) as reference:
            shape = tuple(reference["inputs"].shape[1:])
        runner = load_runner(path, model["runtime"], context.device)
        for row in time_batches(runner, shape, seconds):
            rows.append({"model": name, **model, **row})
            record.progress(
                f"{name} batch {row['batch']}: {row['images_per_s']:,.0f} images/s, "
                f"p50 {row['p50_ms']:.3f} p99 {row['p99_ms']:.3f} ms"
            )
        record.update(rows=rows, skipped=skipped)
    record.update(rows=rows, skipped=skipped)
    if not rows:
        raise StepError("no model could be timed")
    note = f"{len(models) - len(skipped)} models at batches {', '.join(map(str, BATCHES))}"
    return note + (f"; skipped for time: {', '.join(skipped)}" if skipped else "")
