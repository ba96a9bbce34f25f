"""What a benchmark run measured, step by step, and the ratios between its parts.

One step is one measurement of one server: closed loop at a concurrency, or open loop at an
offered rate. `served` is the real server, `transport` the same server with --null-compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.ceiling import CeilingPoint, ceiling_at
from benchmarks.clients import Job, late_clients
from benchmarks.common import Sample
from benchmarks.figures import FIGURE_HEADERS, Figures, figure_cells, figures, write_report
from client.table import format_table

SERVED = "served"
TRANSPORT = "transport"


@dataclass
class Step(Figures):
    server: str  # SERVED | TRANSPORT
    mode: str  # "closed" | "open"
    concurrency: int  # closed loop: requests in flight; open loop: 0
    images_per_request: int
    offered_rate: float | None  # open loop: requests/s sent, whatever the answers do
    mean_batch_size: float | None  # from the server's /metrics; None for an external target
    # Per client process that took part: requests in flight (closed loop; they sum to
    # `concurrency`) or requests/s offered (open loop; they sum to `offered_rate`).
    client_shares: list[float]
    # Requests the clients had in flight at once, at most (closed loop: `concurrency`).
    peak_in_flight: int
    # Per client process: seconds its load began after the agreed start, and the processes
    # later than the tolerance (their load missed part of the warm-up or of the window).
    client_start_late_s: list[float]
    late_clients: list[int]


def step_from(
    server: str,
    jobs: Sequence[Job],
    images: int,
    sample: Sample,
    mean_batch: float | None,
) -> Step:
    rate = jobs[0].rate
    shares = [job.share for job in jobs]
    return Step(
        **vars(figures(sample, images)),
        server=server,
        mode="closed" if rate is None else "open",
        concurrency=int(sum(shares)) if rate is None else 0,
        images_per_request=images,
        offered_rate=None if rate is None else round(sum(shares), 6),
        mean_batch_size=mean_batch,
        client_shares=shares,
        peak_in_flight=sample.peak_in_flight,
        client_start_late_s=list(sample.start_late_s),
        late_clients=late_clients(sample),
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


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_steps(steps: Sequence[Step]) -> str:
    headers = ["SERVER", "MODE", "CONC", "IMG/REQ", "RATE", "BATCH", *FIGURE_HEADERS, "LATE"]
    rows = [
        [
            s.server,
            s.mode,
            s.concurrency if s.mode == "closed" else "-",
            s.images_per_request,
            "-" if s.offered_rate is None else f"{s.offered_rate:.0f}",
            "n/a" if s.mean_batch_size is None else f"{s.mean_batch_size:.2f}",
            *figure_cells(s),
            # Client processes that began late: "0" is the normal case.
            str(len(s.late_clients)) + ("!" if s.late_clients else ""),
        ]
        for s in steps
    ]
    return format_table(headers, rows, right=range(2, len(headers)))


def late_warning(steps: Sequence[Step]) -> str | None:
    """One line naming the steps where a client process began late, if any did."""
    late = [s for s in steps if s.late_clients]
    if not late:
        return None
    worst = max(max(s.client_start_late_s) for s in late)
    return (
        f"warning: in {len(late)} step(s) a client process began its load up to {worst:.3f} s "
        "after the agreed start (column LATE; the machine was busy): its warm-up was that "
        "much shorter, or, past the warm-up, the measured window held less load than set"
    )


def format_ceiling(points: Sequence[CeilingPoint]) -> str:
    """The table; every point ran `instances` runtime instances at once, as the server does."""
    rows = [[p.batch_size, f"{p.images_per_s:,.0f}", f"{p.batch_ms:.3f}"] for p in points]
    return format_table(["BATCH", "IMG/S", "MS/BATCH"], rows, right=range(3))


def format_ratios(found: dict[str, list[dict]]) -> str:
    lines = []
    for r in found["served_vs_transport"]:
        lines.append(
            f"served / transport ceiling, concurrency {r['concurrency']}, "
            f"{r['images_per_request']} img/request: {r['ratio']:.2f} "
            f"(p50 {r['p50_difference_ms']:+.2f} ms; by server CPU per request: "
            f"{_ratio(r['cpu_per_request_ratio'])})"
        )
    for r in found["served_vs_compute"]:
        lines.append(
            f"served / compute ceiling at batch {r['mean_batch_size']:.1f}, concurrency "
            f"{r['concurrency']}, {r['images_per_request']} img/request: {r['ratio']:.2f} "
            f"({r['served_images_per_s']:,.0f} of {r['ceiling_images_per_s']:,.0f} images/s)"
        )
    return "\n".join(lines) or "(no ratios: needs --model-repository)"


def save(
    path: Path,
    settings: dict[str, object],
    ceiling: Sequence[CeilingPoint],
    steps: Sequence[Step],
    found: dict[str, list[dict]],
) -> None:
    write_report(
        path,
        {
            "settings": settings,
            "compute_ceiling": [asdict(p) for p in ceiling],
            "steps": [asdict(s) for s in steps],
            "ratios": found,
        },
    )
