"""Exemplars: the trace of a sampled request, shown beside the histogram bucket it fell into.

prometheus_client stores exemplars only in single-process mode (its multiprocess values drop
them), and with --workers N the worker that answers /metrics is rarely the one that served a
given request. So exemplars live beside the metrics, not in them: each worker keeps, in an
`ExemplarStore`, the latest sampled observation per (histogram, label set, bucket); the worker
that answers a scrape gathers every worker's store over the control channel
(server.processes.cluster), keeps the newest per bucket (`newest`), and `exemplar_app` writes
them onto the histograms' `_bucket` samples. Only OpenMetrics carries exemplars, so only a
scrape that asks for it (Prometheus does) pays for the gathering; the classic text format is
served as before.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar as PromExemplar
from prometheus_client.samples import Sample

log = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]  # a series' labels (without `le`), sorted by name
Key = tuple[str, Labels, float]  # (histogram name, labels, bucket upper bound)
_OPENMETRICS_TYPE = OPENMETRICS.split(";")[0]


@dataclass(frozen=True)
class Exemplar:
    metric: str  # the histogram's name, without `_bucket`
    labels: Labels
    le: float  # the upper bound of the bucket the value fell into (inf for +Inf)
    value: float
    timestamp: float  # seconds since the epoch
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits

    @property
    def key(self) -> Key:
        return (self.metric, self.labels, self.le)


class ExemplarStore:
    """The latest exemplar per bucket of this process's histograms. One event loop only."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self._bounds = [float(b) for b in buckets]
        self._latest: dict[Key, Exemplar] = {}

    def record(
        self, metric: str, labels: Labels, value: float, trace_id: str, span_id: str
    ) -> None:
        index = bisect.bisect_left(self._bounds, value)  # buckets are `le`: inclusive
        le = self._bounds[index] if index < len(self._bounds) else math.inf
        exemplar = Exemplar(metric, labels, le, value, time.time(), trace_id, span_id)
        self._latest[exemplar.key] = exemplar

    def snapshot(self) -> list[Exemplar]:
        return list(self._latest.values())


def newest(exemplars: Iterable[Exemplar]) -> dict[Key, Exemplar]:
    """Several workers' exemplars merged: the most recent per bucket."""
    merged: dict[Key, Exemplar] = {}
    for exemplar in exemplars:
        kept = merged.get(exemplar.key)
        if kept is None or exemplar.timestamp > kept.timestamp:
            merged[exemplar.key] = exemplar
    return merged


class _WithExemplars(Collector):
    """`source`'s metrics with the fetched exemplars on their histogram buckets."""

    def __init__(self, source: Collector, fetch: Callable[[], Iterable[Exemplar]]) -> None:
        self._source = source
        self._fetch = fetch

    def collect(self) -> Iterator[Metric]:
        try:
            found = newest(self._fetch())
        except Exception:  # a scrape without exemplars beats a failed scrape
            log.warning("could not gather exemplars; serving the metrics without them")
            found = {}
        metrics = {name for name, _, _ in found}
        for family in self._source.collect():
            if family.type == "histogram" and family.name in metrics:
                family.samples = [_decorated(family.name, s, found) for s in family.samples]
            yield family


def _decorated(metric: str, sample: Sample, found: dict[Key, Exemplar]) -> Sample:
    if not sample.name.endswith("_bucket") or "le" not in sample.labels:
        return sample
    labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
    exemplar = found.get((metric, labels, float(sample.labels["le"])))
    if exemplar is None:
        return sample
    ids = {"trace_id": exemplar.trace_id, "span_id": exemplar.span_id}
    return sample._replace(exemplar=PromExemplar(ids, exemplar.value, exemplar.timestamp))


def exemplar_app(registry: Collector, fetch: Callable[[], Iterable[Exemplar]]) -> Any:
    """The /metrics WSGI app: OpenMetrics scrapes get exemplars from `fetch`, others do not."""
    plain = make_wsgi_app(registry)
    with_exemplars = CollectorRegistry(auto_describe=False)
    with_exemplars.register(_WithExemplars(registry, fetch))
    decorated = make_wsgi_app(with_exemplars)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        _, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        wanted = content_type.split(";")[0] == _OPENMETRICS_TYPE
        return (decorated if wanted else plain)(environ, start_response)

    return app
