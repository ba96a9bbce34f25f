"""The compute ceiling: the model's runtime alone, in this process, batch after batch.

It loads the model the way the server does (server.core.repository reads the config, the server's
Settings and the config give the runtime threads, server.runtimes creates the sessions: one per
instance of the config's instance_group, each run from a thread of its own at the same time,
as the batcher runs them), so the images/s it measures at each batch size are what the served
path could reach at that batch size if gRPC, decoding and batching cost nothing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import BenchError
from server.config import Settings, parse_settings
from server.core.loading import runtime_interface, sample_inputs
from server.core.repository import RepositoryError, read_model
from server.errors import ModelNotFoundError
from server.runtimes import Runtime, RuntimeLoadError, create_runtime
from server.runtimes.base import Tensors

# Runs timed at each batch size: at least this many, then as many as fit in the time given.
MIN_RUNS = 3


@dataclasses.dataclass(frozen=True)
class CeilingPoint:
    batch_size: int
    images_per_s: float  # all instances together
    batch_ms: float  # median time of one run on one instance
    instances: int  # runtime instances run at once (the model's instance_group count)


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
    sizes: Sequence[int] | None = None,
) -> list[CeilingPoint]:
    """Images/s of the model's latest version at batch sizes 1, 2, 4, ... max_batch_size
    (or at `sizes`, each capped at max_batch_size)."""
    try:
        spec = read_model(repository, model, settings)
    except (RepositoryError, ModelNotFoundError) as error:
        raise BenchError(f"cannot read model {model!r} from {repository}: {error}") from None
    path = spec.model_path(spec.versions[-1])
    runtimes: list[Runtime] = []
    try:
        for _ in range(spec.instance_count):
            threads = spec.intra_op_threads
            runtimes.append(
                create_runtime(
                    spec.platform, path, spec.device_pref, threads, runtime_interface(spec)
                )
            )
        points = []
        rng = np.random.default_rng(0)
        with ThreadPoolExecutor(len(runtimes), thread_name_prefix="ceiling") as pool:
            largest = max(spec.max_batch_size, 1)
            wanted = batch_sizes(largest) if sizes is None else sizes
            for size in sorted({min(max(s, 1), largest) for s in wanted}):
                zeros = sample_inputs(spec, size)
                if zeros is None:
                    raise BenchError(f"model {model!r} takes strings: no batch can be made up")
                batch = {n: rng.random(z.shape).astype(z.dtype) for n, z in zeros.items()}
                n = len(runtimes)
                timed = list(pool.map(_timed_runs, runtimes, [batch] * n, [seconds_per_size] * n))
                span = max(t.end for t in timed) - min(t.began for t in timed)
                times = [x for t in timed for x in t.times]
                point = CeilingPoint(
                    size,
                    round(size * len(times) / span, 1),
                    round(1000 * float(np.median(times)), 4),
                    len(runtimes),
                )
                progress(f"runtime alone, batch {size}: {point.images_per_s:,.0f} images/s")
                points.append(point)
    except RuntimeLoadError as error:
        raise BenchError(f"cannot load {model!r} for the compute ceiling: {error}") from None
    finally:
        for runtime in runtimes:
            runtime.close()
    return points


@dataclasses.dataclass(frozen=True)
class _Runs:
    times: list[float]
    began: float  # perf_counter() when the first timed run began
    end: float  # ... and when the last one ended


def _timed_runs(runtime: Runtime, batch: Tensors, seconds: float) -> _Runs:
    """One instance: an untimed first run (it allocates), then runs for `seconds`."""
    runtime.run(batch)
    times: list[float] = []
    began = time.perf_counter()
    end = began + seconds
    while len(times) < MIN_RUNS or time.perf_counter() < end:
        t0 = time.perf_counter()
        runtime.run(batch)
        times.append(time.perf_counter() - t0)
    return _Runs(times, began, time.perf_counter())


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
