"""The figures every benchmark reports, computed one way: rates, latency percentiles, errors and
CPU from a measured Sample; their table cells; and the JSON file they are saved in."""

from __future__ import annotations

import collections
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import Sample

FIGURE_HEADERS = ["REQ/S", "IMG/S", "P50 MS", "P90 MS", "P99 MS", "ERRORS"]
FIGURE_HEADERS += ["SRV CPU", "MS/REQ", "CLI CPU"]


@dataclass
class Figures:
    requests: int
    requests_per_s: float
    images_per_s: float
    latency_ms: dict[str, float]
    errors: dict[str, int]
    # CPU seconds used per second of measurement (1.0 = one core busy): shows which side
    # saturated. None for an external target, whose CPU the tool cannot read.
    server_cpu_cores: float | None
    # Server CPU per request answered: unlike requests/s, it does not depend on how much of a
    # shared machine the server got during the measurement.
    server_cpu_ms_per_request: float | None
    client_cpu_cores: float


def figures(sample: Sample, images_per_request: int) -> Figures:
    requests = len(sample.latencies_s)
    duration = sample.duration_s
    server_cpu = sample.server_cpu_s
    return Figures(
        requests=requests,
        requests_per_s=round(requests / duration, 2),
        images_per_s=round(requests * images_per_request / duration, 2),
        latency_ms=percentiles(sample.latencies_s),
        errors=dict(sample.errors),
        server_cpu_cores=None if server_cpu is None else round(server_cpu / duration, 3),
        server_cpu_ms_per_request=(
            None if server_cpu is None or not requests else round(1000 * server_cpu / requests, 4)
        ),
        client_cpu_cores=round(sample.client_cpu_s / duration, 3),
    )


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    if not latencies_s:
        return {}
    ms = np.asarray(latencies_s) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "mean": round(float(ms.mean()), 3),
        "max": round(float(ms.max()), 3),
    }


def pooled(samples: Sequence[Sample], server_cpu_s: float | None, *, at_once: bool) -> Sample:
    """Samples as one: taken at once (client processes sharing one window: their loads add
    up) or one after another (rounds: their durations add up, as if one longer run)."""
    errors: collections.Counter[str] = collections.Counter()
    for sample in samples:
        errors.update(sample.errors)
    peaks = [sample.peak_in_flight for sample in samples]
    return Sample(
        [x for sample in samples for x in sample.latencies_s],
        errors,
        samples[0].duration_s if at_once else sum(sample.duration_s for sample in samples),
        sum(sample.client_cpu_s for sample in samples),
        server_cpu_s,
        sum(peaks) if at_once else max(peaks),
        tuple(late for sample in samples for late in sample.start_late_s),
    )


def _cores(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def figure_cells(f: Figures) -> list[str]:
    """The cells under FIGURE_HEADERS."""
    lat = f.latency_ms
    return [
        f"{f.requests_per_s:.1f}",
        f"{f.images_per_s:.1f}",
        *(f"{lat[p]:.2f}" if p in lat else "-" for p in ("p50", "p90", "p99")),
        ",".join(f"{code}:{n}" for code, n in sorted(f.errors.items())) or "0",
        _cores(f.server_cpu_cores),
        _cores(f.server_cpu_ms_per_request),
        _cores(f.client_cpu_cores),
    ]


def machine() -> dict[str, object]:
    """Where the figures were taken: they mean little without it."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def write_report(path: Path, body: dict[str, object]) -> None:
    """`body` as JSON, with when and where it was measured, to compare with a later run."""
    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **body}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
