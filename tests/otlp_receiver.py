"""A real OTLP/gRPC trace receiver on loopback: the TraceService of the `opentelemetry-proto`
package served by grpc, keeping every span it is sent, as a collector (Jaeger, Tempo, the
OpenTelemetry Collector) would receive them from the server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


def attributes_of(pairs: Any) -> dict[str, Any]:
    return {pair.key: value_of(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


@dataclass(frozen=True)
class Link:
    trace_id: str
    span_id: str


@dataclass(frozen=True)
class Span:
    name: str
    trace_id: str  # hex
    span_id: str
    parent_span_id: str  # "" for a root
    kind: int  # trace_pb2.Span.SpanKind
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: tuple[Link, ...]
    events: tuple[tuple[str, dict[str, Any]], ...]
    status_code: int  # trace_pb2.Status.StatusCode
    resource: dict[str, Any] = field(hash=False)

    @property
    def is_error(self) -> bool:
        return self.status_code == trace_pb2.Status.STATUS_CODE_ERROR


SERVER = trace_pb2.Span.SPAN_KIND_SERVER
INTERNAL = trace_pb2.Span.SPAN_KIND_INTERNAL


class _Service(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        spans = []
        for resource_spans in request.resource_spans:
            resource = attributes_of(resource_spans.resource.attributes)
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    spans.append(
                        Span(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            attributes=attributes_of(s.attributes),
                            links=tuple(Link(x.trace_id.hex(), x.span_id.hex()) for x in s.links),
                            events=tuple((e.name, attributes_of(e.attributes)) for e in s.events),
                            status_code=s.status.code,
                            resource=resource,
                        )
                    )
        self._receiver.add(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    def __init__(self) -> None:
        self._spans: list[Span] = []
        self._changed = threading.Condition()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Service(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, spans: list[Span]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self._changed.notify_all()

    def spans(self, trace_id: str | None = None) -> list[Span]:
        with self._changed:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def wait_for(
        self, done: Callable[[list[Span]], bool], what: str, timeout: float = 20.0
    ) -> list[Span]:
        """Every span received, once `done` says they are enough; raises after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done(self._spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({(s.name, s.trace_id[:8]) for s in self._spans})
                    raise AssertionError(f"no {what} within {timeout}s; received: {names}")
                self._changed.wait(min(left, 0.5))
            return list(self._spans)

    def stop(self) -> None:
        self._server.stop(0)
