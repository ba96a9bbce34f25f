"""`compare`'s results: one outcome per configuration, its ratios to the first, a table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from benchmarks.common import Config, Sample
from benchmarks.figures import FIGURE_HEADERS, Figures, figure_cells, figures, pooled
from benchmarks.rounds import ratios_of
from client.table import format_table


@dataclass
class Outcome(Figures):
    label: str
    config: dict[str, object]
    duration_s: float
    images: int
    rounds_requests_per_s: list[float]
    ratios: dict[str, float] = field(default_factory=dict)


def summarize(config: Config, samples: Sequence[Sample]) -> Outcome:
    """Rounds of one configuration add up as if they were one longer run."""
    server = [sample.server_cpu_s for sample in samples]
    server_cpu = None if None in server else sum(s or 0.0 for s in server)
    sample = pooled(samples, server_cpu, at_once=False)
    found = figures(sample, config.batch)
    return Outcome(
        **vars(found),
        label=config.label,
        config={k: v for k, v in asdict(config).items() if k != "label"},
        duration_s=sample.duration_s,
        images=found.requests * config.batch,
        rounds_requests_per_s=[round(len(s.latencies_s) / s.duration_s, 2) for s in samples],
    )


def add_ratios(outcomes: list[Outcome]) -> None:
    """Each outcome relative to the first, the baseline of a --compare run."""
    first = outcomes[0]
    for outcome in outcomes:
        outcome.ratios = ratios_of(
            {
                "requests_per_s": (outcome.requests_per_s, first.requests_per_s),
                "images_per_s": (outcome.images_per_s, first.images_per_s),
                "p50": (outcome.latency_ms.get("p50"), first.latency_ms.get("p50")),
                "p99": (outcome.latency_ms.get("p99"), first.latency_ms.get("p99")),
            }
        )


def format_report(outcomes: list[Outcome]) -> str:
    headers = ["LABEL", "API", "CONC", "BATCH", *FIGURE_HEADERS, "X REQ/S", "X P99"]
    rows = [
        [
            o.label,
            o.config["api"],
            o.config["concurrency"],
            o.config["batch"],
            *figure_cells(o),
            f"{o.ratios.get('requests_per_s', 0):.2f}" if o.ratios else "-",
            f"{o.ratios.get('p99', 0):.2f}" if o.ratios else "-",
        ]
        for o in outcomes
    ]
    return format_table(headers, rows, right=range(2, len(headers)))
