"""The models served on the device by one server process, under closed-loop load.

One server holds every model that runs on the device; each is measured at 1, 8 and 64 images
per request and several concurrencies, fp32 and fp16 side by side at each point, with the
suite's own step (benchmarks.suite.measure_step: client processes sharing one window, the
server's CPU and its mean formed batch read over that window). The measurements are sized to
the step's time box; points that would not fit are listed as skipped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import fields
from importlib import metadata
from typing import Any

from benchmarks.gpu.context import Context, Recorder, StepError
from benchmarks.gpu.repository import models_on_device

IMAGES = (1, 8, 64)
CONCURRENCY = {False: (1, 8, 32), True: (4,)}
WARMUP_S = {False: 0.5, True: 0.1}
# Shortest and longest measurement of a point.
DURATION_S = {False: (0.5, 2.0), True: (0.25, 0.4)}
# Seconds each point costs besides its warm-up and duration (start lead, collecting, scrapes),
# and a server's start on the device (CUDA contexts, loading, warm-up, reference checks).
POINT_OVERHEAD_S = 0.7
SERVER_START_S = {False: 25.0, True: 8.0}
REQUEST_TIMEOUT_S = 10.0
NATIVE_TRANSPORT = "pygrpc-native"


def transport_args() -> list[str]:
    """grpcio when the server has a --grpc-transport and pygrpc-native is not installed here
    (the GPU machine lacks it unless carried), so that a default of native cannot fail."""
    from server.config import Settings

    if "grpc_transport" not in {f.name for f in fields(Settings)}:
        return []
    try:
        metadata.version(NATIVE_TRANSPORT)
    except metadata.PackageNotFoundError:
        return ["--grpc-transport", "grpcio"]
    return []


def server_args(context: Context, workers: int, relaxed: bool) -> list[str]:
    args = ["--device", context.device, "--workers", str(workers), *transport_args()]
    tolerance = context.result_of("checks").get("suggested_tolerance") if relaxed else None
    if tolerance:
        args += ["--reference-tolerance", str(tolerance)]
    return args


@contextlib.contextmanager
def start_on_device(
    context: Context,
    models: Sequence[str],
    record: Recorder,
    workers: int = 1,
    relaxed: bool = True,
) -> Iterator[Any]:
    """A server on the run's device with `models` (`relaxed`: the tolerance checks suggested)."""
    from benchmarks.common import BenchError
    from benchmarks.server import start_server

    args = [*server_args(context, workers, relaxed), "--models", ",".join(models)]
    record.progress(f"starting a server: {' '.join(args)}")
    try:
        with start_server(context.repository, args) as server:
            yield server
    except BenchError as error:
        raise StepError(str(error)) from None


def client_processes(at_least: int = 1) -> int:
    """Client processes: half the cores (the server and its threads have the rest), 1 on a
    small machine; never fewer than `at_least` (a worker per connection)."""
    return max(at_least, min(8, (os.cpu_count() or 2) // 2))


def measure(
    pool: Any, server: Any, model: str, concurrency: int, images: int, timing: Any
) -> dict[str, Any]:
    """One closed-loop point against a started server, as a row of figures."""
    from benchmarks.suite import SERVED, Endpoint, Plan, measure_step

    endpoint = Endpoint(
        name=SERVED,
        target=server.target,
        cpu_seconds=server.cpu_seconds,
        metrics_url=server.metrics_url,
    )
    plan = Plan(
        model=model,
        concurrency=(concurrency,),
        images=(images,),
        rates=(),
        rate_fractions=(),
        timing=timing,
        ceiling_s=0.0,
        seed=0,
    )
    step = measure_step(pool, endpoint, plan, concurrency, images)
    return {
        "images": images,
        "concurrency": concurrency,
        "images_per_s": step.images_per_s,
        "requests_per_s": step.requests_per_s,
        "p50_ms": step.latency_ms.get("p50"),
        "p99_ms": step.latency_ms.get("p99"),
        "mean_batch": step.mean_batch_size,
        "errors": step.errors,
        "server_cpu_cores": step.server_cpu_cores,
        "client_cpu_cores": step.client_cpu_cores,
    }


def describe(row: dict[str, Any]) -> str:
    p50, p99 = row["p50_ms"], row["p99_ms"]
    latency = f"p50 {p50:.2f} p99 {p99:.2f} ms" if p50 is not None else "no answers"
    errors = f", errors {row['errors']}" if row["errors"] else ""
    return f"{row['images_per_s']:,.0f} images/s, {latency}, mean batch {row['mean_batch']}{errors}"


def run(context: Context, record: Recorder) -> str:
    from benchmarks.clients import ClientPool
    from benchmarks.measure import Timing
    from client.api import ClassifierClient

    models = models_on_device(context)
    if not models:
        raise StepError("no model runs on this device")
    concurrencies = CONCURRENCY[context.quick]
    points = len(models) * len(IMAGES) * len(concurrencies)
    warmup = WARMUP_S[context.quick]
    per_point = (record.time_left() - SERVER_START_S[context.quick]) / points
    shortest, longest = DURATION_S[context.quick]
    duration = min(max(per_point - warmup - POINT_OVERHEAD_S, shortest), longest)
    timing = Timing(warmup, round(duration, 2), REQUEST_TIMEOUT_S)
    processes = client_processes()
    record.update(
        timing_s={"warmup": warmup, "duration": timing.duration_s}, client_processes=processes
    )
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    with start_on_device(context, list(models), record) as server, ClientPool(processes) as pool:
        with ClassifierClient(server.target, timeout=30.0) as client:
            ready = {m.name for m in client.list_models() if m.ready}
        not_ready = sorted(set(models) - ready)
        record.update(not_ready=not_ready)
        if not ready:
            raise StepError(f"no model turned READY in the server: {', '.join(not_ready)}")
        for images in IMAGES:
            for concurrency in concurrencies:
                for name in (n for n in models if n in ready):
                    point = f"{name} {images} img/req c{concurrency}"
                    if record.time_left() < warmup + timing.duration_s + POINT_OVERHEAD_S:
                        skipped.append(point)
                        continue
                    row = {
                        "model": name,
                        **models[name],
                        **measure(pool, server, name, concurrency, images, timing),
                    }
                    rows.append(row)
                    record.progress(f"{point}: {describe(row)}")
                    record.update(rows=rows, skipped=skipped)
    record.update(rows=rows, skipped=skipped)
    note = (
        f"{len(rows)} points ({len(ready)} models x {len(IMAGES)} request sizes x concurrency "
        f"{', '.join(map(str, concurrencies))}), {timing.duration_s:g} s each"
    )
    if not_ready:
        note += f"; not ready: {', '.join(not_ready)}"
    if skipped:
        note += f"; {len(skipped)} points skipped for time"
    return note
