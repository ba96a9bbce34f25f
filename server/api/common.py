"""What the APIs share: model resolution (with draining), request statistics, streaming
fan-out, registration."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import descriptor, message, message_factory

from server.api.status import Call, RequestMetrics
from server.api.traced import TracedCall
from server.errors import InvalidInputError, ModelUnavailableError
from server.observability import tracing
from server.observability.metrics import Metrics

if TYPE_CHECKING:
    from server.core.manager import ModelManager
    from server.core.modelstats import Timing
    from server.core.served import ServedModel
    from server.processes.cluster import Cluster

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Requests of one stream in progress or answered but not yet sent; past it the stream stops
# reading (backpressure, also against a client that sends without reading its answers).
STREAM_CONCURRENCY = 128


@dataclass
class ApiState:
    """The core as the servicers see it, plus the draining flag.

    `manager` serves this worker's requests; `cluster` answers for the whole server (every
    worker: readiness, model states, statistics, load and unload), set once it is built.
    """

    manager: ModelManager
    metrics: Metrics
    draining: bool = False
    request_metrics: RequestMetrics = field(init=False)
    cluster: Cluster = field(init=False)

    def __post_init__(self) -> None:
        self.request_metrics = RequestMetrics(self.metrics)

    def call(
        self,
        api: str,
        context: grpc.aio.ServicerContext | None,
        *,
        name: str = "",
        carrier: Iterable[tuple[str, Any]] | None = None,
    ) -> Call:
        """The request's metrics (and, with tracing on, its span: `name` and `carrier`, the
        headers holding the caller's trace context, for transports other than gRPC)."""
        if tracing.ACTIVE is not None:  # all that tracing costs while it is off
            return TracedCall(self.request_metrics, api, context, name=name, carrier=carrier)
        return Call(self.request_metrics, api, context)

    def resolve(self, name: str, version: str, call: Call) -> ServedModel:
        """The model version that answers an inference request; UNAVAILABLE while draining."""
        if self.draining:
            raise ModelUnavailableError("the server is shutting down; retry on another replica")
        try:
            served = self.manager.get(name, version)
        except ModelUnavailableError:
            # The name is known, the version string is the caller's: labelling by it would
            # let made-up versions grow the metric series without bound.
            call.bind(name, "")
            raise
        call.bind(served.name, str(served.version))
        return served

    @property
    def ready(self) -> bool:
        """This worker's readiness (the server's is cluster.view().ready)."""
        return self.manager.all_ready and not self.draining


class recorded:  # lower case: called like the function it replaced
    """Count the request in `served`'s statistics: a success once the block ends (the
    answer encoded), a failure if it raises; a cancelled request is neither.

    A class rather than a generator-based context manager: one of these per request, and a
    generator plus its wrapper cost 0.8 us more each (docs/benchmarks.md, the native path).
    """

    __slots__ = ("_served", "_timing")

    def __init__(self, served: ServedModel, timing: Timing) -> None:
        self._served = served
        self._timing = timing

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self._served.stats.succeeded(self._timing)
        elif issubclass(exc_type, Exception):
            self._served.stats.failed(self._timing)


class Undecodable:
    """Stands in for a request message whose bytes do not parse.

    gRPC would answer a deserializer's exception with UNKNOWN, the message type's full name
    and a traceback in the log, and count nothing. Instead the servicer gets this: reading
    any field raises InvalidInputError, so it is answered INVALID_ARGUMENT and counted like
    any other malformed request. `blank` (an empty message) is what a stream's error echoes.
    """

    def __init__(self, message_class: type[message.Message]) -> None:
        self.blank = message_class()
        self.what = message_class.DESCRIPTOR.name

    def __getattr__(self, name: str) -> Any:
        raise InvalidInputError(f"the request is not a valid {self.what} message")


def _lenient(message_class: type[message.Message]) -> Callable[[bytes], Any]:
    parse = message_class.FromString

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except message.DecodeError:
            return Undecodable(message_class)

    return deserialize


async def answer_concurrently(
    requests: AsyncIterator[Req],
    answer: Callable[[Req], Awaitable[Resp]],
    fail: Callable[[Req, Exception], Resp],
) -> AsyncIterator[Resp]:
    """Answer a request stream's messages concurrently, yielding each answer as it is ready.

    Concurrency is what lets one stream fill the batcher. `answer` raising becomes `fail`'s
    response for that message, so one bad message never ends the stream.
    """
    results: asyncio.Queue[Any] = asyncio.Queue()
    slots = asyncio.Semaphore(STREAM_CONCURRENCY)
    tasks: set[asyncio.Task[None]] = set()
    end = object()

    async def run(request: Req) -> None:
        try:
            results.put_nowait(await answer(request))
        except Exception as exc:
            echo = request.blank if isinstance(request, Undecodable) else request
            results.put_nowait(fail(echo, exc))

    async def read() -> None:
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(run(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.wait(set(tasks))
        finally:
            results.put_nowait(end)

    reader = asyncio.create_task(read())
    try:
        while (item := await results.get()) is not end:
            yield item
            slots.release()  # a slot covers a request until its answer is sent
        await reader  # re-raises a failure to read the stream
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()


_HANDLER_KINDS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handler_kind(
    request_streaming: bool, response_streaming: bool
) -> Callable[..., grpc.RpcMethodHandler]:
    """gRPC's constructor of a method handler for that kind of call (which sides stream)."""
    return _HANDLER_KINDS[(request_streaming, response_streaming)]


# A service's method handlers under the name clients call it by, as servers register them.
Service = tuple[str, dict[str, grpc.RpcMethodHandler]]


def method_handlers(
    service: descriptor.ServiceDescriptor, servicer: object, wire_name: str
) -> Service:
    """Method handlers for every method of `service`, to add under `wire_name`
    (server.api.transport.register).

    The KServe messages live in our own protobuf package, so the service name clients call
    (`inference.GRPCInferenceService`) is given here rather than taken from the descriptor.
    A servicer missing a method fails here, at start, not on the first call.
    """
    handlers = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        kind = method_handler_kind(method.client_streaming, method.server_streaming)
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_lenient(request),
            response_serializer=response.SerializeToString,
        )
    return wire_name, handlers
