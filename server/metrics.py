"""Every Prometheus metric the server exports, in one place.

Each server instance owns its own registry, so several servers in one process (tests)
never mix their figures. Names follow Prometheus conventions: base units, `_total` counters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Iterator
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "imgserve"
MODEL_LABELS = ("model", "version")
# Seconds: from 100 us (a cached MLP batch) to 10 s (a saturated queue).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Inference requests answered, by model, version, API and gRPC status code.",
            (*MODEL_LABELS, "api", "code"),
            registry=r,
        )
        self.inferences = Counter(
            f"{PREFIX}_inferences",
            "Images run through a model (rows of all executed batches).",
            MODEL_LABELS,
            registry=r,
        )
        self.batches = Counter(
            f"{PREFIX}_batches",
            "Batches executed on a runtime, by outcome (success or failure).",
            (*MODEL_LABELS, "outcome"),
            registry=r,
        )
        self.dropped = Counter(
            f"{PREFIX}_requests_dropped",
            "Queued requests dropped before compute, by reason (deadline or cancelled).",
            (*MODEL_LABELS, "reason"),
            registry=r,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from receiving an inference request to answering it.",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            f"{PREFIX}_queue_duration_seconds",
            "Time a request waited in the batcher's queue before its batch started.",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            f"{PREFIX}_compute_duration_seconds",
            "Time the runtime took to run one batch.",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Images per batch formed by the dynamic batcher.",
            MODEL_LABELS,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Requests waiting in the batcher's queue.",
            MODEL_LABELS,
            registry=r,
        )
        self.inflight = Gauge(
            f"{PREFIX}_inflight_requests",
            "Inference requests received and not yet answered.",
            ("model",),
            registry=r,
        )
        self.model_ready = Gauge(
            f"{PREFIX}_model_ready",
            "1 when the model version serves requests, 0 otherwise.",
            MODEL_LABELS,
            registry=r,
        )
        # What each version is, as labels on a 1 (the "info" pattern): one series per version,
        # where a precision label on every request metric would multiply them all. Join it in
        # queries: `... * on (model, version) group_left (precision) imgserve_model_info`.
        # A version that stops serving keeps its series at 0, as imgserve_model_ready does
        # (prometheus_client's multiprocess mode cannot remove a series).
        self.model_info = Gauge(
            f"{PREFIX}_model_info",
            "1 for each model version that serves, labelled with its platform and precision.",
            (*MODEL_LABELS, "platform", "precision"),
            registry=r,
            multiprocess_mode="livemax",
        )
        self._described: dict[tuple[str, str], tuple[str, str]] = {}
        self.load_duration = Gauge(
            f"{PREFIX}_model_load_duration_seconds",
            "Time the last load of a model version took (load, warm-up and reference check).",
            MODEL_LABELS,
            registry=r,
        )
        self.auth_rejections = Counter(
            f"{PREFIX}_auth_rejections",
            "gRPC calls refused by token authentication (UNAUTHENTICATED, PERMISSION_DENIED).",
            ("code",),
            registry=r,
        )
        self.registry.register(GpuCollector())

    def describe_version(
        self, model: str, version: str, platform: str = "", precision: str = ""
    ) -> None:
        """imgserve_model_info of a version that serves (platform and precision given: 1) or no
        longer does (neither: its last description goes to 0)."""
        key = (model, version)
        previous = self._described.get(key)
        if previous is not None and previous != (platform, precision):
            self.model_info.labels(model, version, *previous).set(0)
        if platform:
            self.model_info.labels(model, version, platform, precision).set(1)
            self._described[key] = (platform, precision)

    def watch_event_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Export imgserve_event_loop_tasks for `loop` (the server's): a leak shows as growth."""
        self.registry.register(EventLoopCollector(loop))

    def serve_http(self, host: str, port: int) -> tuple[WSGIServer, Thread, int]:
        """Serve /metrics; returns the server, its thread and the bound port (port 0 picks one)."""
        httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        return httpd, thread, httpd.server_port


class EventLoopCollector(Collector):
    """Tasks alive on the server's event loop, counted at scrape time.

    The scrape runs in the metrics HTTP thread; asyncio.all_tasks is safe only on the loop's
    own thread, so the count is taken there (call_soon_threadsafe). A loop too busy to answer
    within a second, or closed, leaves the gauge out of that scrape rather than stall it.
    """

    NAME = f"{PREFIX}_event_loop_tasks"
    HELP = "asyncio tasks alive on the server's event loop (requests in progress, batch loops)."

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.NAME, self.HELP)  # registration must not wait on the loop

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counted: concurrent.futures.Future[int] = concurrent.futures.Future()

        def count() -> None:
            if not counted.done():
                counted.set_result(len(asyncio.all_tasks(self._loop)))

        try:
            self._loop.call_soon_threadsafe(count)
            tasks = counted.result(timeout=1.0)
        except (RuntimeError, concurrent.futures.TimeoutError):  # loop closed, or too busy
            counted.cancel()
            return
        yield GaugeMetricFamily(self.NAME, self.HELP, value=tasks)


class GpuCollector(Collector):
    """GPU utilisation and memory per device through NVML.

    The three families are always declared (HELP/TYPE lines), with no samples when there is
    no GPU: dashboards and alert rules that name them then point at metrics that exist.
    """

    def __init__(self) -> None:
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:  # no driver, no library, or no device: nothing to export
            log.debug("NVML not available; GPU metrics disabled")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        util = GaugeMetricFamily(
            f"{PREFIX}_gpu_utilization_ratio", "GPU busy fraction (0..1).", labels=["gpu"]
        )
        used = GaugeMetricFamily(
            f"{PREFIX}_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"]
        )
        total = GaugeMetricFamily(
            f"{PREFIX}_gpu_memory_total_bytes", "GPU memory in total.", labels=["gpu"]
        )
        if self._nvml is None:
            yield from (util, used, total)
            return
        nvml = self._nvml
        # Any NVML call can fail (NotSupported on MIG devices, GPU lost, driver reloaded): skip
        # what fails, or the whole scrape fails and every other metric goes missing with it.
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            log.debug("NVML: cannot count devices: %s", exc)
            count = 0
        for index in range(count):
            label = [str(index)]
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except nvml.NVMLError as exc:
                log.debug("NVML: gpu %d: %s", index, exc)
                continue
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                util.add_metric(label, rates.gpu / 100.0)
            except nvml.NVMLError as exc:
                log.debug("NVML: gpu %d utilisation: %s", index, exc)
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric(label, float(memory.used))
                total.add_metric(label, float(memory.total))
            except nvml.NVMLError as exc:
                log.debug("NVML: gpu %d memory: %s", index, exc)
        yield from (util, used, total)
