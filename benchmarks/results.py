"""What a benchmark run measured, step by step, and the ratios between its parts.

One step is one measurement of one server: closed loop at a concurrency, or open loop at an
offered rate. `served` is the real server, `transport` the same server with --null-compute.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.ceiling import CeilingPoint, ceiling_at
from benchmarks.common import Sample
from benchmarks.report import percentiles
from client.table import format_table

SERVED = "served"
TRANSPORT = "transport"


@dataclass
class Step:
    server: str  # SERVED | TRANSPORT
    mode: str  # "closed" | "open"
    concurrency: int  # closed loop: requests in flight; open loop: 0
    images_per_request: int
    offered_rate: float | None  # open loop: requests/s sent, whatever the answers do
    requests: int
    requests_per_s: float
    images_per_s: float
    latency_ms: dict[str, float]
    errors: dict[str, int]
    mean_batch_size: float | None  # from the server's /metrics; None for an external target
    server_cpu_cores: float | None  # CPU seconds per second; None for an external target
    # Server CPU per request answered: unlike requests/s, it does not depend on how much of a
    # shared machine the server got during the step.
    server_cpu_ms_per_request: float | None
    client_cpu_cores: float


def step_from(
    server: str,
    mode: str,
    concurrency: int,
    images: int,
    rate: float | None,
    sample: Sample,
    mean_batch: float | None,
) -> Step:
    requests = len(sample.latencies_s)
    duration = sample.duration_s
    server_cpu = sample.server_cpu_s
    return Step(
        server=server,
        mode=mode,
        concurrency=concurrency,
        images_per_request=images,
        offered_rate=rate,
        requests=requests,
        requests_per_s=round(requests / duration, 2),
        images_per_s=round(requests * images / duration, 2),
        latency_ms=percentiles(sample.latencies_s),
        errors=dict(sample.errors),
        mean_batch_size=mean_batch,
        server_cpu_cores=None if server_cpu is None else round(server_cpu / duration, 3),
        server_cpu_ms_per_request=(
            None if server_cpu is None or not requests else round(1000 * server_cpu / requests, 4)
        ),
        client_cpu_cores=round(sample.client_cpu_s / duration, 3),
    )


def ratios(steps: Sequence[Step], ceiling: Sequence[CeilingPoint]) -> dict[str, list[dict]]:
    """served / transport at the same concurrency and request size; served / compute ceiling
    at the batch the served step formed (its mean, interpolated between measured sizes)."""
    closed = [s for s in steps if s.mode == "closed"]
    transport = {(s.concurrency, s.images_per_request): s for s in closed if s.server == TRANSPORT}
    vs_transport, vs_compute = [], []
    for step in (s for s in closed if s.server == SERVED):
        key = (step.concurrency, step.images_per_request)
        base = {"concurrency": step.concurrency, "images_per_request": step.images_per_request}
        null = transport.get(key)
        if null is not None and null.images_per_s > 0:
            p50 = step.latency_ms.get("p50", 0.0) - null.latency_ms.get("p50", 0.0)
            vs_transport.append(
                {
                    **base,
                    "served_images_per_s": step.images_per_s,
                    "transport_images_per_s": null.images_per_s,
                    "ratio": round(step.images_per_s / null.images_per_s, 4),
                    "p50_difference_ms": round(p50, 3),
                    # Transport CPU per request / served CPU per request: the throughput ratio
                    # a CPU-bound server would reach, robust to a noisy shared machine.
                    "cpu_per_request_ratio": _cpu_ratio(null, step),
                }
            )
        if ceiling and step.mean_batch_size:
            limit = ceiling_at(ceiling, step.mean_batch_size)
            vs_compute.append(
                {
                    **base,
                    "mean_batch_size": step.mean_batch_size,
                    "served_images_per_s": step.images_per_s,
                    "ceiling_images_per_s": round(limit, 1),
                    "ratio": round(step.images_per_s / limit, 4),
                }
            )
    return {"served_vs_transport": vs_transport, "served_vs_compute": vs_compute}


def _cpu_ratio(null: Step, served: Step) -> float | None:
    if not null.server_cpu_ms_per_request or not served.server_cpu_ms_per_request:
        return None
    return round(null.server_cpu_ms_per_request / served.server_cpu_ms_per_request, 4)


def _cores(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_steps(steps: Sequence[Step]) -> str:
    headers = ["SERVER", "MODE", "CONC", "IMG/REQ", "RATE", "REQ/S", "IMG/S", "P50 MS"]
    headers += ["P90 MS", "P99 MS", "BATCH", "ERRORS", "SRV CPU", "MS/REQ", "CLI CPU"]
    rows = []
    for s in steps:
        lat = s.latency_ms
        rows.append(
            [
                s.server,
                s.mode,
                s.concurrency if s.mode == "closed" else "-",
                s.images_per_request,
                "-" if s.offered_rate is None else f"{s.offered_rate:.0f}",
                f"{s.requests_per_s:.1f}",
                f"{s.images_per_s:.1f}",
                *(f"{lat[p]:.2f}" if p in lat else "-" for p in ("p50", "p90", "p99")),
                "n/a" if s.mean_batch_size is None else f"{s.mean_batch_size:.2f}",
                ",".join(f"{code}:{n}" for code, n in sorted(s.errors.items())) or "0",
                _cores(s.server_cpu_cores),
                _cores(s.server_cpu_ms_per_request),
                _cores(s.client_cpu_cores),
            ]
        )
    return format_table(headers, rows, right=range(2, len(headers)))


def format_ceiling(points: Sequence[CeilingPoint]) -> str:
    rows = [[p.batch_size, f"{p.images_per_s:,.0f}", f"{p.batch_ms:.3f}"] for p in points]
    return format_table(["BATCH", "IMG/S", "MS/BATCH"], rows, right=range(3))


def format_ratios(found: dict[str, list[dict]]) -> str:
    lines = []
    for r in found["served_vs_transport"]:
        lines.append(
            f"served / transport ceiling, concurrency {r['concurrency']}, "
            f"{r['images_per_request']} img/request: {r['ratio']:.2f} "
            f"(p50 {r['p50_difference_ms']:+.2f} ms; by server CPU per request: "
            f"{_cores(r['cpu_per_request_ratio'])})"
        )
    for r in found["served_vs_compute"]:
        lines.append(
            f"served / compute ceiling at batch {r['mean_batch_size']:.1f}, concurrency "
            f"{r['concurrency']}, {r['images_per_request']} img/request: {r['ratio']:.2f} "
            f"({r['served_images_per_s']:,.0f} of {r['ceiling_images_per_s']:,.0f} images/s)"
        )
    return "\n".join(lines) or "(no ratios: needs --model-repository)"


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


def write_report(
    path: Path,
    settings: dict[str, object],
    ceiling: Sequence[CeilingPoint],
    steps: Sequence[Step],
    found: dict[str, list[dict]],
) -> None:
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "settings": settings,
        "compute_ceiling": [asdict(p) for p in ceiling],
        "steps": [asdict(s) for s in steps],
        "ratios": found,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
