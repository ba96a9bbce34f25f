"""Every Prometheus metric the server exports, in one place.

Each server instance owns its own registry, so several servers in one process (tests)
never mix their figures. Names follow Prometheus conventions: base units, `_total` counters.

With several worker processes (--workers), prometheus_client's multiprocess mode keeps every
value in a file per process under PROMETHEUS_MULTIPROC_DIR (the supervisor sets it before the
workers start), and whichever worker answers /metrics reads them all: one server from the
outside. Counters and histograms of a worker that died keep counting in the totals; each gauge
says how its workers' values combine (its `multiprocess_mode`), over live workers only.

Every family, and every label set known in advance, exists at zero from the start (Prometheus's
instrumentation advice): multiprocess mode shows only the families some worker wrote, and the
dashboard and alert rules query them all before the first request. Unlabelled metrics and the
authentication outcomes are touched here; a model version's series when it starts serving
(`serving`), the batcher's when its batcher is built (server.core.batcher).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from socketserver import ThreadingMixIn
from threading import Thread
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from server.observability.exemplars import Exemplar, exemplar_app

log = logging.getLogger(__name__)

PREFIX = "imgserve"
MODEL_LABELS = ("model", "version")
# Seconds: from 100 us (a cached MLP batch) to 10 s (a saturated queue).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The `code` values of imgserve_auth_rejections_total (gRPC status names, as server.api.security
# counts them).
AUTH_REJECTION_CODES = ("UNAUTHENTICATED", "PERMISSION_DENIED")
# How often each worker samples its event loop's task count.
EVENT_LOOP_SAMPLE_S = 1.0


def multiprocess() -> bool:
    """True in a worker of --workers N: values live in files shared by every worker."""
    return bool(os.environ.get(MULTIPROCESS_ENV))


class Metrics:
    def __init__(self, apis: Sequence[str] = ()) -> None:
        """`apis`: the `api` labels of the front-ends this process serves, whose request series
        each serving version gets from the start (`serving`)."""
        self.apis = tuple(apis)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Inference requests answered, by model, version, API (kserve, http, native) and "
            "gRPC status code (HTTP requests too: server.api.status maps them to HTTP statuses).",
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
            "Requests waiting in the batcher's queue (all workers).",
            MODEL_LABELS,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.inflight = Gauge(
            f"{PREFIX}_inflight_requests",
            "Inference requests received and not yet answered (all workers).",
            ("model",),
            registry=r,
            multiprocess_mode="livesum",
        )
        self.model_ready = Gauge(
            f"{PREFIX}_model_ready",
            "1 when the model version serves requests on every worker, 0 otherwise.",
            MODEL_LABELS,
            registry=r,
            multiprocess_mode="livemin",
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
            "Time the last load of a model version took (load, warm-up and reference check; "
            "the slowest worker's).",
            MODEL_LABELS,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.event_loop_tasks = Gauge(
            f"{PREFIX}_event_loop_tasks",
            "asyncio tasks alive on the servers' event loops (requests in progress, batch "
            "loops; all workers, sampled every second): a leak shows as growth.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.workers = Gauge(
            f"{PREFIX}_workers",
            "Worker processes serving the ports (1 without --workers).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.worker_restarts = Counter(
            f"{PREFIX}_worker_restarts",
            "Worker processes restarted by the supervisor after they died (the supervisor "
            "logs each one's cause: the signal that killed it, or its exit status).",
            registry=r,
        )
        self.auth_rejections = Counter(
            f"{PREFIX}_auth_rejections",
            "Calls (gRPC or HTTP) refused by token authentication (UNAUTHENTICATED, "
            "PERMISSION_DENIED).",
            ("code",),
            registry=r,
        )
        for code in AUTH_REJECTION_CODES:  # whether or not tokens are configured
            self.auth_rejections.labels(code)
        self._gpu = GpuCollector()
        self.registry.register(self._gpu)

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

    def serving(self, model: str, version: str) -> None:
        """A version serves on this worker: its request series exist (at 0) before its first
        request, each API's success count among them, so rates and ratios have a base."""
        for api in self.apis:
            self.requests.labels(model, version, api, "OK")
        self.request_duration.labels(model, version)
        self.inflight.labels(model)

    def watch_event_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sample the task count of `loop` (the server's) every EVENT_LOOP_SAMPLE_S, from it."""

        def sample() -> None:
            self.event_loop_tasks.set(len(asyncio.all_tasks(loop)))
            loop.call_later(EVENT_LOOP_SAMPLE_S, sample)

        loop.call_soon(sample)

    def exposition_registry(self) -> CollectorRegistry:
        """What /metrics shows: this process's registry, or every worker's files plus the GPU."""
        if not multiprocess():
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(self._gpu)
        return registry

    def serve_http(
        self,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        exemplars: Callable[[], Iterable[Exemplar]] | None = None,
    ) -> tuple[WSGIServer, Thread, int]:
        """Serve /metrics in a thread; returns the server, its thread and the bound port.

        Port 0 picks one. `reuse_port`: join the SO_REUSEPORT group the supervisor made, so
        every worker answers the same port. `exemplars`: where OpenMetrics scrapes get the
        histograms' exemplars from (tracing on: server.observability.exemplars).
        """
        server_class = _ReusePortServer if reuse_port else _Server
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        server_class = type("MetricsServer", (server_class,), {"address_family": family[0][0]})
        registry = self.exposition_registry()
        app = make_wsgi_app(registry) if exemplars is None else exemplar_app(registry, exemplars)
        httpd = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        thread = Thread(target=httpd.serve_forever, name="metrics http", daemon=True)
        thread.start()
        return httpd, thread, httpd.server_port


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scrape must not hold up the exit


class _ReusePortServer(_Server):
    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are not worth a log line each."""


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
