"""OpenTelemetry tracing of inference requests, off unless an OTLP endpoint is configured.

Off (the default), OpenTelemetry is never imported and a request pays one check: `ACTIVE is
None` (server.api.common.ApiState.call; the batchers keep the same answer from their start).
On, each process that serves (the lone server, or each worker of --workers N) has its own
TracerProvider, BatchSpanProcessor and OTLP/gRPC exporter; the resource names the worker
(`imgserve.worker.index`) and the process (`process.pid`, `service.instance.id`).

The spans of one sampled request, joined to the caller's trace through the W3C `traceparent`
and `tracestate` it sent (gRPC metadata or HTTP headers: `Tracing.start_request` takes any
sequence of key/value pairs):

    inference.GRPCInferenceService/ModelInfer   SERVER; request id, model, version, status
      decode    from resolving the model to queueing its images (parsing, validation)
      queue     in the batcher's queue, one per queued chunk
      compute   its batch on the runtime; linked to the batch's own span
      encode    from the answer's return to the response
    batch       INTERNAL, in a trace of its own: the runtime run of one batch, with its size,
                the model version, and a link to every sampled request that rode in it

A batch is shared by requests of several traces, so it belongs to none of them: it is
recorded once, and sampled whenever any request in it is (`_ServerSampler`). Sampled
requests also leave exemplars (server.observability.exemplars) and put their trace id on log lines
(server.observability.logs.TRACE).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from importlib import metadata
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from server.observability.exemplars import ExemplarStore
from server.observability.metrics import LATENCY_BUCKETS, PREFIX
from server.observability.tracing_config import DEFAULT_SERVICE_NAME, TracingConfig

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanContext, Tracer


log = logging.getLogger(__name__)

REQUEST_METRIC = f"{PREFIX}_request_duration_seconds"
QUEUE_METRIC = f"{PREFIX}_queue_duration_seconds"
# How long a stopping process waits for its last spans to be sent.
FLUSH_TIMEOUT_S = 2.0
# gRPC status codes a server span is an error for (OpenTelemetry's gRPC conventions): the
# others (INVALID_ARGUMENT, NOT_FOUND...) are the caller's doing, recorded but not an error.
SERVER_ERRORS = frozenset(
    ("UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS")
)
_GRPC_CODES = {code.name: code.value[0] for code in grpc.StatusCode}


class QueueItem(Protocol):
    """What the batcher's queue items show the tracer (server.core.batcher._Item)."""

    rows: int
    enqueued: float  # time.monotonic()
    trace: RequestTrace | None


# The sampled request being served in this context (set by server.api.traced.TracedCall);
# the batcher reads it when it queues the request's images.
CURRENT: ContextVar[RequestTrace | None] = ContextVar("imgserve_trace", default=None)


class RequestTrace:
    """The span of one sampled request and the spans of its stages."""

    __slots__ = ("_decode", "_encode", "_grpc", "_tracing", "ids", "queued_ns", "span", "stages")

    def __init__(self, tracing: Tracing, span: Span, grpc: bool) -> None:
        """`grpc`: the request came over gRPC (its status code is recorded as gRPC's too)."""
        from opentelemetry.trace import set_span_in_context

        self._tracing = tracing
        self.span = span
        self.stages = set_span_in_context(span)  # the stage spans' parent
        self._grpc = grpc
        self._decode: Span | None = None
        self._encode: Span | None = None
        self.queued_ns = 0  # when its images were queued (time.time_ns()): decode's end
        context = span.get_span_context()
        self.ids = (format(context.trace_id, "032x"), format(context.span_id, "016x"))

    @property
    def context(self) -> SpanContext:
        return self.span.get_span_context()

    def bind(self, model: str, version: str) -> None:
        """The model that answers is known: decoding starts."""
        self.span.set_attributes({"imgserve.model.name": model, "imgserve.model.version": version})
        if self._decode is None:
            self._decode = self._tracing.tracer.start_span("decode", self.stages)

    def queued(self, images: int) -> None:
        """The request's images went into the batcher's queue: decoding is over."""
        self.queued_ns = time.time_ns()
        self.span.set_attribute("imgserve.images", images)
        if self._decode is not None and self._decode.is_recording():
            self._decode.end(self.queued_ns)

    def answered(self) -> None:
        """Its rows came back from the batcher: encoding the response starts."""
        self._encode = self._tracing.tracer.start_span("encode", self.stages)

    def finish(
        self, code: str, error: BaseException | None, model: str, version: str, duration_s: float
    ) -> None:
        """End the request's span with its status (`code`: a gRPC status code's name)."""
        from opentelemetry.trace import Status, StatusCode

        span = self.span
        attributes: dict[str, Any] = {"imgserve.status_code": code}
        if self._grpc:
            attributes["rpc.grpc.status_code"] = _GRPC_CODES.get(code, 2)
        if code != "OK":
            attributes["error.type"] = code
        span.set_attributes(attributes)
        if error is not None and code not in ("CANCELLED", "DEADLINE_EXCEEDED"):
            span.record_exception(error)
        if code in SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, f"{code}: {error}" if error else code))
        for stage in (self._decode, self._encode):
            if stage is not None and stage.is_recording():  # the stage it failed in
                if code != "OK":
                    stage.set_status(Status(StatusCode.ERROR, code))
                stage.end()
        span.end()
        if model:
            labels = (("model", model), ("version", version))
            self._tracing.exemplars.record(REQUEST_METRIC, labels, duration_s, *self.ids)


class _ServerSampler:
    """The sampler of the server's spans, for the decisions `Tracing.start_request` leaves it.

    - A request without a caller's trace (a root) is decided before any span is made, by the
      root ratio alone (`Tracing.start_request`): an unsampled request then costs a random
      draw instead of a span, and a root that reaches this sampler is one to keep.
    - A request joined to a caller's trace (a remote parent): the configured sampler decides
      (parent-based ones follow the caller's sampled flag).
    - The stages of a request (a local parent) follow it.
    - A batch's span, the root of a trace of its own, is kept when a request that links to it
      is: a trace-id sampler would keep it in a different 1% than the requests.
    """

    def __init__(self, configured: Any) -> None:
        self._configured = configured

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: Any = None,
        attributes: Any = None,
        links: Sequence[Any] | None = None,
        trace_state: Any = None,
    ) -> Any:
        from opentelemetry.sdk.trace.sampling import Decision, SamplingResult
        from opentelemetry.trace import get_current_span

        parent = get_current_span(parent_context).get_span_context()
        if parent.is_valid and parent.is_remote:
            return self._configured.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )
        if parent.is_valid:
            keep = parent.trace_flags.sampled
        elif links:
            keep = any(link.context.trace_flags.sampled for link in links)
        else:
            keep = True
        decision = Decision.RECORD_AND_SAMPLE if keep else Decision.DROP
        state = parent.trace_state if parent.is_valid else None
        return SamplingResult(decision, attributes if keep else None, state)

    def get_description(self) -> str:
        return f"ImgserveServer{{{self._configured.get_description()}}}"


def _sampler(name: str, ratio: float) -> tuple[Any, float]:
    """The provider's sampler and the root ratio (the share of callers without a trace kept)."""
    from opentelemetry.sdk.trace import sampling

    configured = {
        "always_on": lambda: sampling.ALWAYS_ON,
        "always_off": lambda: sampling.ALWAYS_OFF,
        "traceidratio": lambda: sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": lambda: sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
    }[name]()
    root = 0.0 if name.endswith("always_off") else ratio if "ratio" in name else 1.0
    return _ServerSampler(configured), root


def _version() -> str:
    try:
        return metadata.version("imgserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class _PairsGetter:
    """Reads propagation headers from a sequence of (key, value) pairs, keys in any case."""

    def get(self, carrier: Iterable[tuple[str, Any]], key: str) -> list[str] | None:
        found = [
            value.decode("latin-1") if isinstance(value, bytes) else value
            for name, value in carrier
            if name.lower() == key
        ]
        return found or None

    def keys(self, carrier: Iterable[tuple[str, Any]]) -> list[str]:
        return [name for name, _ in carrier]


class Tracing:
    """This process's tracer provider, exporter and exemplars."""

    def __init__(
        self, config: TracingConfig, worker: int | None, exporter: SpanExporter | None = None
    ) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.propagate import get_global_textmap
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.config = config
        explicit: dict[str, Any] = {"service.version": _version(), "process.pid": os.getpid()}
        if worker is not None:
            explicit["imgserve.worker.index"] = worker
        explicit.update(config.resource_attributes)
        if config.service_name:
            explicit[SERVICE_NAME] = config.service_name
        resource = Resource.create(explicit)  # adds OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        self.resource = resource
        sampler, self.root_ratio = _sampler(config.sampler, config.ratio)
        # Not on exit: the server flushes at its stop, bounded (shutdown); an exit handler
        # would wait for an unreachable collector for as long as the exporter retries.
        self.provider: TracerProvider = TracerProvider(
            sampler=sampler,
            resource=resource,
            shutdown_on_exit=False,
        )
        self.exporter = exporter or OTLPSpanExporter(endpoint=config.endpoint)
        self.provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.tracer: Tracer = self.provider.get_tracer("imgserve", _version())
        self.exemplars = ExemplarStore(LATENCY_BUCKETS)
        self._propagator = get_global_textmap()  # OTEL_PROPAGATORS; W3C tracecontext by default
        self._fields = frozenset(self._propagator.fields)  # the headers it reads
        self._getter = _PairsGetter()

    def parent(self, carrier: Iterable[tuple[str, Any]]) -> Context:
        """The caller's trace context from its metadata or headers (`traceparent`...)."""
        return self._propagator.extract(carrier, getter=self._getter)

    def start_request(
        self, name: str, carrier: Iterable[tuple[str, Any]], grpc: bool = False
    ) -> RequestTrace | None:
        """Start a request's SERVER span; None when it is not sampled (nothing more to do).

        Any transport can call it: gRPC passes its invocation metadata, HTTP its headers.
        A request that carries no trace context is decided by one random draw against the
        root ratio first, so the 99% a 1% sampler drops cost no span at all.
        """
        from opentelemetry.trace import SpanKind

        pairs = list(carrier)
        if any(key.lower() in self._fields for key, _ in pairs):
            parent: Context | None = self.parent(pairs)
        else:
            ratio = self.root_ratio
            if ratio < 1 and (ratio <= 0 or random.random() >= ratio):
                return None
            parent = None
        span = self.tracer.start_span(name, parent, kind=SpanKind.SERVER)
        if not span.is_recording():
            return None
        return RequestTrace(self, span, grpc)

    def record_batch(
        self,
        model: str,
        version: str,
        items: Sequence[QueueItem],
        started: float,
        compute_ns: int,
        error: BaseException | None,
    ) -> None:
        """Spans of one batch run, if a sampled request rode in it: the batch's own, and each
        sampled request's queue and compute spans. `started`: when the batch was taken
        (time.monotonic()); `compute_ns`: how long the runtime took (just now)."""
        traced = [item for item in items if item.trace is not None]
        if not traced:
            return
        from opentelemetry.trace import Link, SpanKind, Status, StatusCode

        end_ns, now = time.time_ns(), time.monotonic()
        compute_start_ns = end_ns - compute_ns
        taken_ns = end_ns - int((now - started) * 1e9)
        rows = sum(item.rows for item in items)
        shared = {"imgserve.model.name": model, "imgserve.model.version": version}
        sizes = {"imgserve.batch.size": rows, "imgserve.batch.requests": len(items)}
        tracer = self.tracer
        batch = tracer.start_span(
            "batch",
            kind=SpanKind.INTERNAL,
            attributes={**shared, **sizes},
            links=[Link(item.trace.context) for item in traced if item.trace is not None],
            start_time=compute_start_ns,
        )
        failed = None if error is None else Status(StatusCode.ERROR, type(error).__name__)
        if error is not None and failed is not None:
            batch.record_exception(error)
            batch.set_status(failed)
        batch.end(end_ns)
        to_batch = [Link(batch.get_span_context())]
        labels = (("model", model), ("version", version))
        for item in traced:
            trace = item.trace
            assert trace is not None
            # Its start on the clock decode ended by; its end on the batch's (never before).
            queued_ns = trace.queued_ns or end_ns - int((now - item.enqueued) * 1e9)
            queue = tracer.start_span(
                "queue",
                trace.stages,
                attributes={"imgserve.images": item.rows},
                start_time=queued_ns,
            )
            queue.end(max(taken_ns, queued_ns))
            compute = tracer.start_span(
                "compute",
                trace.stages,
                attributes={**sizes, "imgserve.model.version": version},
                links=to_batch,
                start_time=compute_start_ns,
            )
            if failed is not None:
                compute.set_status(failed)
            compute.end(end_ns)
            queue_id = format(queue.get_span_context().span_id, "016x")
            waited = started - item.enqueued  # as the batcher observed it
            self.exemplars.record(QUEUE_METRIC, labels, waited, trace.ids[0], queue_id)

    def shutdown(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Send what is queued and stop, waiting at most `timeout_s`; True if it finished."""
        done = threading.Event()

        def run() -> None:
            try:
                self.provider.shutdown()
            finally:
                done.set()

        threading.Thread(target=run, name="tracing shutdown", daemon=True).start()
        finished = done.wait(timeout_s)
        if not finished:
            log.warning("traces not sent within %gs of the stop: the rest are dropped", timeout_s)
        return finished


# This process's tracing, or None when it is off: the one check on the request path.
ACTIVE: Tracing | None = None


def install(config: TracingConfig | None, worker: int | None = None) -> Tracing | None:
    """Turn tracing on for this process (None: leave it off)."""
    global ACTIVE
    if config is None:
        return None
    ACTIVE = Tracing(config, worker)
    sampler = config.sampler + (f" {config.ratio:g}" if "ratio" in config.sampler else "")
    log.info(
        "tracing on: OTLP/gRPC to %s, sampler %s, service.name %s",
        config.endpoint, sampler, ACTIVE.resource.attributes.get("service.name"),
    )  # fmt: skip
    return ACTIVE


def uninstall(timeout_s: float = FLUSH_TIMEOUT_S) -> None:
    """Send the last spans and turn tracing off again."""
    global ACTIVE
    tracing, ACTIVE = ACTIVE, None
    if tracing is not None:
        tracing.shutdown(timeout_s)
