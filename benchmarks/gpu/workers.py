"""`--workers 1, 2, 4` on the one device, and the default for `--workers auto` on CUDA.

Each worker process holds a CUDA context and its own copy of the models, and without MPS the
kernels of different processes take turns on the GPU: more workers add CPU for gRPC and
batching, and memory, but no GPU. The sweep serves the CIFAR10 CNN (TorchScript, fp32) with
8-image requests from the same client processes at each count (several connections: a
connection stays on the worker that accepted it), and reads the device's memory in use
before and after each server starts (per worker: the difference over the count) and its
utilisation through the measurement (NVML).

The decision: the fewest workers within DECISION_MARGIN of the best throughput; more only
buy throughput that was measured. Measured on the CPU, the sweep decides nothing for CUDA.
"""

from __future__ import annotations

from typing import Any

from benchmarks.gpu.context import Context, Recorder, StepError
from benchmarks.gpu.repository import models_on_device
from benchmarks.gpu.served import (
    POINT_OVERHEAD_S,
    REQUEST_TIMEOUT_S,
    SERVER_START_S,
    client_processes,
    describe,
    measure,
    start_on_device,
)

COUNTS = {False: (1, 2, 4), True: (1, 2)}
PREFERRED = ("cifar10_ts", "fashion_mnist_ts")  # the first one built is swept
IMAGES = 8
CONCURRENCY = {False: 64, True: 8}
TIMING_S = {False: (1.0, 4.0), True: (0.2, 0.5)}  # warm-up, duration
DECISION_MARGIN = 0.05
# What the server does today with --workers auto, whatever the device (server.processes.cpus).
CURRENT_RULE = "the usable CPUs"


def decide(rows: list[dict[str, Any]], on_cuda: bool) -> dict[str, Any]:
    """The worker count for --workers auto on CUDA, and why (or why none)."""
    usable = [r for r in rows if r["images_per_s"] > 0 and not r["errors"]]
    if not usable:
        return {"workers": None, "measured": False, "note": "no worker count served without errors"}
    best = max(usable, key=lambda r: r["images_per_s"])
    floor = (1 - DECISION_MARGIN) * best["images_per_s"]
    choice = min((r for r in usable if r["images_per_s"] >= floor), key=lambda r: r["workers"])
    why = (
        f"{choice['workers']} worker(s) served {choice['images_per_s']:,.0f} images/s, within "
        f"{DECISION_MARGIN:.0%} of the best ({best['workers']} workers, "
        f"{best['images_per_s']:,.0f} images/s)"
    )
    memory = choice.get("gpu_memory_per_worker_mib")
    if memory:
        why += f"; each worker holds about {memory:,.0f} MiB of the GPU"
    if not on_cuda:
        return {
            "workers": None,
            "measured": False,
            "cpu_sweep_choice": choice["workers"],
            "note": "not measured on a CUDA device: --workers auto on CUDA keeps its current "
            f"rule ({CURRENT_RULE}); this rehearsal's CPU sweep ({why}) says nothing about a GPU",
        }
    return {"workers": choice["workers"], "measured": True, "note": why}


def run(context: Context, record: Recorder) -> str:
    from benchmarks.clients import ClientPool
    from benchmarks.gpu.device import GpuMonitor
    from benchmarks.measure import Timing

    models = models_on_device(context)
    model = next((name for name in PREFERRED if name in models), None)
    if model is None:
        raise StepError(f"none of {', '.join(PREFERRED)} was built")
    counts = COUNTS[context.quick]
    warmup, duration = TIMING_S[context.quick]
    timing = Timing(warmup, duration, REQUEST_TIMEOUT_S)
    on_cuda = context.device == "cuda"
    monitor = GpuMonitor() if on_cuda else None
    processes = client_processes(at_least=max(counts))
    concurrency = CONCURRENCY[context.quick]
    record.update(
        model=model,
        images=IMAGES,
        concurrency=concurrency,
        client_processes=processes,
        memory_source=monitor.source if monitor else None,
    )
    rows: list[dict[str, Any]] = []
    skipped = []
    with ClientPool(processes) as pool:
        for workers in counts:
            needed = SERVER_START_S[context.quick] + warmup + duration + POINT_OVERHEAD_S
            if record.time_left() < needed:
                skipped.append(workers)
                continue
            before = monitor.memory_used_bytes() if monitor else None
            with start_on_device(context, [model], record, workers) as server:
                loaded = monitor.memory_used_bytes() if monitor else None
                if monitor is not None:
                    with monitor.sampling() as samples:
                        row = measure(pool, server, model, concurrency, IMAGES, timing)
                else:
                    samples = []
                    row = measure(pool, server, model, concurrency, IMAGES, timing)
            per_worker = (
                round((loaded - before) / workers / 2**20)
                if loaded is not None and before is not None
                else None
            )
            row = {
                "workers": workers,
                **row,
                "gpu_memory_per_worker_mib": per_worker,
                "gpu_utilisation_mean": round(sum(samples) / len(samples), 1) if samples else None,
                "gpu_utilisation_max": max(samples) if samples else None,
            }
            rows.append(row)
            record.progress(f"{workers} worker(s): {describe(row)}")
            record.update(rows=rows, skipped=skipped)
    decision = decide(rows, on_cuda)
    record.update(rows=rows, skipped=skipped, decision=decision)
    if not rows:
        raise StepError("no worker count could be measured in the time left")
    chosen = decision["workers"]
    return (
        f"--workers auto on CUDA: {chosen}" if chosen else "--workers auto on CUDA: not decided"
    ) + f" ({decision['note']})"
