"""Turns measured rounds into per-configuration results: a terminal table and a JSON file."""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import Config, Sample
from client.table import format_table


@dataclass
class Outcome:
    label: str
    config: dict[str, object]
    duration_s: float
    requests: int
    images: int
    requests_per_s: float
    images_per_s: float
    latency_ms: dict[str, float]
    errors: dict[str, int]
    # CPU seconds used per second of measurement (1.0 = one core busy); shows which side saturated.
    client_cores: float
    server_cores: float | None
    rounds_requests_per_s: list[float]
    ratios: dict[str, float] = field(default_factory=dict)


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


def summarize(config: Config, samples: Sequence[Sample]) -> Outcome:
    """Rounds of one configuration add up as if they were one longer run."""
    latencies = [x for sample in samples for x in sample.latencies_s]
    errors: collections.Counter[str] = collections.Counter()
    for sample in samples:
        errors.update(sample.errors)
    duration = sum(sample.duration_s for sample in samples)
    server = [sample.server_cpu_s for sample in samples]
    requests = len(latencies)
    return Outcome(
        label=config.label,
        config={k: v for k, v in asdict(config).items() if k != "label"},
        duration_s=duration,
        requests=requests,
        images=requests * config.batch,
        requests_per_s=round(requests / duration, 2),
        images_per_s=round(requests * config.batch / duration, 2),
        latency_ms=percentiles(latencies),
        errors=dict(errors),
        client_cores=round(sum(sample.client_cpu_s for sample in samples) / duration, 3),
        server_cores=(
            None if None in server else round(sum(s or 0.0 for s in server) / duration, 3)
        ),
        rounds_requests_per_s=[
            round(len(sample.latencies_s) / sample.duration_s, 2) for sample in samples
        ],
    )


def add_ratios(outcomes: list[Outcome]) -> None:
    """Each outcome relative to the first, the baseline of a --compare run."""
    first = outcomes[0]
    for outcome in outcomes:
        pairs = {
            "requests_per_s": (outcome.requests_per_s, first.requests_per_s),
            "images_per_s": (outcome.images_per_s, first.images_per_s),
            "p50": (outcome.latency_ms.get("p50"), first.latency_ms.get("p50")),
            "p99": (outcome.latency_ms.get("p99"), first.latency_ms.get("p99")),
        }
        outcome.ratios = {
            name: round(value / ref, 3) for name, (value, ref) in pairs.items() if value and ref
        }


def format_report(outcomes: list[Outcome]) -> str:
    headers = ["LABEL", "API", "CONC", "BATCH", "REQ/S", "IMG/S", "P50 MS", "P90 MS", "P99 MS"]
    headers += ["ERRORS", "CPU C/S", "X REQ/S", "X P99"]
    rows = []
    for o in outcomes:
        lat = o.latency_ms
        server = "-" if o.server_cores is None else f"{o.server_cores:.2f}"
        errors = ",".join(f"{code}:{n}" for code, n in sorted(o.errors.items())) or "0"
        rows.append(
            [
                o.label,
                o.config["api"],
                o.config["concurrency"],
                o.config["batch"],
                f"{o.requests_per_s:.1f}",
                f"{o.images_per_s:.1f}",
                *(f"{lat[p]:.2f}" if p in lat else "-" for p in ("p50", "p90", "p99")),
                errors,
                f"{o.client_cores:.2f}/{server}",
                f"{o.ratios.get('requests_per_s', 0):.2f}" if o.ratios else "-",
                f"{o.ratios.get('p99', 0):.2f}" if o.ratios else "-",
            ]
        )
    return format_table(headers, rows, right=range(2, len(headers)))


def write_json(
    path: Path,
    outcomes: list[Outcome],
    target: str,
    duration_s: float,
    warmup_s: float,
    rounds: int,
) -> None:
    """The results with what is needed to compare them with a later run on another machine."""
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target": target,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "rounds": rounds,
        "cpu_count": os.cpu_count(),
        "results": [asdict(o) for o in outcomes],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
