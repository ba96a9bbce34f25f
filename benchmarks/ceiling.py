"""The compute ceiling: the model's runtime alone, in this process, batch after batch.

It loads the model the way the server does (server.repository reads the config, the server's
default Settings give the runtime threads, server.runtimes creates the session), so the
images/s it measures at each batch size are what the served path could reach at that batch
size if gRPC, decoding and batching cost nothing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks.common import BenchError
from server.config import Settings, parse_settings
from server.errors import ModelNotFoundError
from server.repository import RepositoryError, read_model
from server.runtimes import RuntimeLoadError, create_runtime

# Runs timed at each batch size: at least this many, then as many as fit in the time given.
MIN_RUNS = 3


@dataclasses.dataclass(frozen=True)
class CeilingPoint:
    batch_size: int
    images_per_s: float
    batch_ms: float  # median time of one run


def batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to max_batch_size, which is always included."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, max_batch_size})


def server_settings(repository: Path, server_args: Sequence[str]) -> Settings:
    """The Settings the started server gets from the same flags (threads, device, ...)."""
    return parse_settings(["--model-repository", str(repository), *server_args], env={})


def measure_ceiling(
    repository: Path,
    model: str,
    settings: Settings,
    seconds_per_size: float,
    progress: Callable[[str], None] = lambda _: None,
) -> list[CeilingPoint]:
    """Images/s of the model's latest version at batch sizes 1, 2, 4, ... max_batch_size."""
    try:
        spec = read_model(repository, model, settings)
    except (RepositoryError, ModelNotFoundError) as error:
        raise BenchError(f"cannot read model {model!r} from {repository}: {error}") from None
    path = spec.model_path(spec.versions[-1])
    try:
        runtime = create_runtime(spec.platform, path, spec.device_pref, settings.intra_op_threads)
    except RuntimeLoadError as error:
        raise BenchError(f"cannot load {model!r} for the compute ceiling: {error}") from None
    points = []
    try:
        rng = np.random.default_rng(0)
        for size in batch_sizes(spec.max_batch_size):
            batch = rng.random((size, *spec.input_shape), dtype=np.float32)
            runtime.run(batch)  # the first run at a new size allocates
            times: list[float] = []
            end = time.perf_counter() + seconds_per_size
            while len(times) < MIN_RUNS or time.perf_counter() < end:
                t0 = time.perf_counter()
                runtime.run(batch)
                times.append(time.perf_counter() - t0)
            point = CeilingPoint(
                size, round(size * len(times) / sum(times), 1), round(1000 * np.median(times), 4)
            )
            progress(f"runtime alone, batch {size}: {point.images_per_s:,.0f} images/s")
            points.append(point)
    finally:
        runtime.close()
    return points


def ceiling_at(points: Sequence[CeilingPoint], batch: float) -> float:
    """Images/s at a (mean, fractional) batch size: interpolated linearly in log2(batch)."""
    if not points:
        raise ValueError("no ceiling points")
    sizes = np.log2([p.batch_size for p in points])
    rates = [p.images_per_s for p in points]
    return float(np.interp(np.log2(max(batch, 1.0)), sizes, rates))


def best_of(first: Sequence[CeilingPoint], second: Sequence[CeilingPoint]) -> list[CeilingPoint]:
    """Per batch size, the faster of two measurements of the same sizes."""
    return [max(a, b, key=lambda p: p.images_per_s) for a, b in zip(first, second, strict=True)]
