"""The request metrics of server.api.status.Call, plus the request's span, for tracing on.

`ApiState.call` hands these out instead of `Call` only while server.observability.tracing
is on, so a server with tracing off runs none of this. The span is joined to the caller's
trace from its metadata and named after the RPC (`inference.GRPCInferenceService/ModelInfer`),
which the `RpcNames` interceptor notes for the handler: gRPC's servicer context does not say it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from types import TracebackType
from typing import Any

import grpc

from server.api.status import Call, RequestMetrics, outcome
from server.observability import tracing
from server.observability.logs import REQUEST_ID, TRACE

# The full name of the RPC being handled ("/package.Service/Method"), set by RpcNames.
RPC_METHOD: ContextVar[str] = ContextVar("rpc_method", default="")


class RpcNames(grpc.aio.ServerInterceptor):
    """Notes each RPC's full method name in RPC_METHOD for the handler (the same task)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        RPC_METHOD.set(handler_call_details.method)
        return await continuation(handler_call_details)


def rpc_attributes(method: str, api: str) -> dict[str, Any]:
    """The span's name and attributes of an RPC named `/package.Service/Method`."""
    service, _, name = method.lstrip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name, "imgserve.api": api}


class TracedCall(Call):
    """A Call whose request is a span (a sampled one) or at least a sampling decision."""

    __slots__ = ("_trace",)

    def __init__(
        self,
        metrics: RequestMetrics,
        api: str,
        context: grpc.aio.ServicerContext | None = None,
        *,
        name: str = "",
        carrier: Iterable[tuple[str, Any]] | None = None,
    ) -> None:
        """`name` and `carrier` (the headers) for other transports; gRPC's come from `context`."""
        super().__init__(metrics, api, context)
        active = tracing.ACTIVE
        method = RPC_METHOD.get()
        if carrier is None:
            carrier = (context.invocation_metadata() or ()) if context is not None else ()
        span_name = name or method.lstrip("/") or f"{api} inference"
        self._trace = trace = (
            active.start_request(span_name, carrier, grpc=bool(method))
            if active is not None
            else None
        )
        if trace is not None:  # sampled: the attributes are worth building
            attributes = rpc_attributes(method, api) if method else {"imgserve.api": api}
            request_id = REQUEST_ID.get()
            if request_id:
                attributes["imgserve.request_id"] = request_id
            trace.span.set_attributes(attributes)

    def bind(self, model: str, version: str = "") -> None:
        super().bind(model, version)
        if self._trace is not None:
            self._trace.bind(model, version)

    def __enter__(self) -> TracedCall:
        # Set for every call, sampled or not, so nothing of an earlier request in the same
        # task (an HTTP connection's keep-alive) is taken for this one's.
        trace = self._trace
        tracing.CURRENT.set(trace)
        TRACE.set(trace.ids if trace is not None else None)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        duration = time.perf_counter() - self._started
        super().__exit__(exc_type, exc, tb)
        trace = self._trace
        if trace is not None:
            code = "OK" if exc is None else outcome(exc, self._context)
            trace.finish(code, exc, self.model, self.version, duration)
