"""The one table from core exceptions to status codes, and the wrappers that apply it.

Core exceptions map to gRPC status codes; the HTTP/REST API answers the same code as its
HTTP status (HTTP_STATUS: Triton's for the codes Triton has, the usual gRPC-to-HTTP mapping
for the others), so both transports report an error alike.

Servicer methods raise the core's exceptions (server.errors) and never build a status
themselves: `guarded` turns an exception into the mapped status, and anything unexpected
into INTERNAL with a generic message (the traceback goes to the log, never to the caller).
`Call` records the request metrics of one inference request with the same codes.

`guarded` also gives every RPC its request id: the caller's `x-request-id` metadata when it is
usable (server.observability.logs.valid_request_id), else a new one. It goes back in the trailing
metadata, which travels with the status (initial metadata would cost a write of its own per
call: about a quarter of the server's CPU per request at concurrency 32, docs/benchmarks.md),
and is set in server.observability.logs.REQUEST_ID, so every log line about the request carries it.
Client errors are logged at DEBUG without a traceback; unexpected errors at ERROR with one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn, TypeVar

import grpc

from server.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelControlDisabledError,
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    RepositoryPollError,
    UnsupportedError,
)
from server.observability.logs import REQUEST_ID, new_request_id, valid_request_id
from server.observability.metrics import Metrics

log = logging.getLogger(__name__)

STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    ModelUnavailableError: grpc.StatusCode.UNAVAILABLE,
    UnsupportedError: grpc.StatusCode.UNIMPLEMENTED,
    ModelControlDisabledError: grpc.StatusCode.FAILED_PRECONDITION,
    RepositoryPollError: grpc.StatusCode.INTERNAL,  # Triton's code; the message is the caller's
}
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_LOGGED = "_imgserve_logged"
INTERNAL_MESSAGE = "internal error while serving the request (details are in the server log)"
REQUEST_ID_KEY = "x-request-id"
# With several workers, every answer also names the worker that gave it (its index), so a
# caller (or an on-call engineer with a request id) can tell which process served a call.
WORKER_KEY = "x-imgserve-worker"
_worker_metadata: tuple[tuple[str, str], ...] = ()
# Every gRPC answer names what carried it (server.api.transport): "native" when
# pygrpc-native's front ran the handler, "grpcio" for grpc.aio, pygrpc-native's fallback
# (streams, reflection) included. Told by the servicer context's class, so it is the truth
# about this call, not about the configuration.
TRANSPORT_KEY = "x-imgserve-transport"
_transports: dict[type, tuple[str, str]] = {}
# grpc.aio says None when the caller set no deadline; pygrpc-native says sys.maxsize seconds,
# as grpcio's sync server does.
_NO_DEADLINE_S = float(sys.maxsize)


def name_worker(index: int) -> None:
    """Called once at the start of a worker of several."""
    global _worker_metadata
    _worker_metadata = ((WORKER_KEY, str(index)),)


F = TypeVar("F", bound=Callable[..., Any])


def code_of(exc: BaseException) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def describe(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and caller-facing message; logs unexpected errors with their traceback."""
    code = code_of(exc)
    if code is grpc.StatusCode.INTERNAL and not isinstance(exc, RepositoryPollError):
        if getattr(exc, _LOGGED, False):  # one failed batch fails many requests: one traceback
            log.error("request failed with the error logged above: %s", type(exc).__name__)
        else:
            log.error("unexpected error while serving a request", exc_info=exc)
            with contextlib.suppress(AttributeError, TypeError):
                setattr(exc, _LOGGED, True)
        return code, INTERNAL_MESSAGE
    message = str(exc) or type(exc).__name__
    log.debug("request answered %s: %s", code.name, message)
    return code, message


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's `x-request-id` when it is usable, else a new id (the caller's is logged)."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return choose_request_id(value)
    return new_request_id()


def choose_request_id(value: str | bytes | None) -> str:
    """The caller's id when it is usable, else a new one (the unusable one is logged)."""
    if value is None:
        return new_request_id()
    request_id = valid_request_id(value)
    if request_id is not None:
        return request_id
    replacement = new_request_id()
    log.debug(
        "x-request-id %.64r is not 1..128 printable ASCII characters; using %s",
        value, replacement,
    )  # fmt: skip
    return replacement


def answer_metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    """What every answer carries besides its payload: its request id, and with several
    workers the worker that gave it."""
    return ((REQUEST_ID_KEY, request_id), *_worker_metadata)


def _transport(context: grpc.aio.ServicerContext) -> tuple[str, str]:
    """The TRANSPORT_KEY metadata of a call answered with this context (one per class)."""
    kind = type(context)
    pair = _transports.get(kind)
    if pair is None:
        native = kind.__module__.startswith("pygrpc_native")
        pair = _transports[kind] = (TRANSPORT_KEY, "native" if native else "grpcio")
    return pair


def _start(context: grpc.aio.ServicerContext) -> None:
    """Name the request in this task's log lines; its status will tell the caller its id."""
    request_id = request_id_of(context)
    REQUEST_ID.set(request_id)  # the RPC's own task: nothing to reset afterwards
    context.set_trailing_metadata((*answer_metadata(request_id), _transport(context)))


def guarded(method: F) -> F:
    """Wrap a servicer method (unary or streaming) so exceptions become gRPC statuses."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            _start(context)
            try:
                async for response in method(self, request, context):
                    yield response
            except Exception as exc:
                code, message = describe(exc)
            else:
                return
            await _abort(context, code, message)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        _start(context)
        try:
            response = await method(self, request, context)
        except Exception as exc:
            code, message = describe(exc)
        else:
            if _expired(context):
                await _expire(context)  # nobody is waiting for the answer (see _abort)
            return response
        await _abort(context, code, message)

    return unary  # type: ignore[return-value]


def _expired(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


async def _expire(context: grpc.aio.ServicerContext) -> NoReturn:
    """End a call whose deadline passed. grpcio's core has answered it DEADLINE_EXCEEDED
    already: the handler ends as cancelled, which sends and logs nothing more. pygrpc-native
    leaves the answer to the handler, and would answer a cancelled one CANCELLED."""
    if type(context).__module__.split(".")[0] == "grpc":
        raise asyncio.CancelledError
    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    raise AssertionError("abort returns by raising")  # pragma: no cover


def _remaining(context: grpc.aio.ServicerContext | None) -> float | None:
    """Seconds left before the call's deadline; None when the caller set none."""
    remaining = context.time_remaining() if context is not None else None
    return None if remaining is None or remaining >= _NO_DEADLINE_S else remaining


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """Send the error status. A call whose deadline passed, or whose caller hung up, while
    it was being answered cannot take one: gRPC would log that failure as an ERROR with a
    traceback, though it is the caller's doing. Ending the RPC as cancelled logs nothing."""
    if _expired(context):
        await _expire(context)
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise  # the status was sent: this is how abort ends the RPC
    except Exception as exc:
        log.debug("could not send %s: the call ended first (%s)", code.name, type(exc).__name__)
        raise asyncio.CancelledError from None


def deadline_of(context: grpc.aio.ServicerContext | None) -> float | None:
    """The RPC's deadline on the time.monotonic() clock, or None when the client set none."""
    remaining = _remaining(context)
    return None if remaining is None else time.monotonic() + remaining


def outcome(exc: BaseException, context: grpc.aio.ServicerContext | None) -> str:
    """The status code's name a request that raised `exc` is counted under."""
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining() if context is not None else None
        expired = remaining is not None and remaining <= 0
        return "DEADLINE_EXCEEDED" if expired else "CANCELLED"
    return code_of(exc).name


class RequestMetrics:
    """The request metrics' children per label set, looked up once per label set.

    `.labels()` validates and locks on every call and costs more than the update it
    precedes; the label sets are the known models' (see Call), so these maps stay small.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._counts: dict[tuple[str, str, str, str], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}
        self._inflight: dict[str, Any] = {}

    def count(self, model: str, version: str, api: str, code: str) -> Any:
        key = (model, version, api, code)
        child = self._counts.get(key)
        if child is None:
            child = self._counts[key] = self._metrics.requests.labels(*key)
        return child

    def duration(self, model: str, version: str) -> Any:
        key = (model, version)
        child = self._durations.get(key)
        if child is None:
            child = self._durations[key] = self._metrics.request_duration.labels(*key)
        return child

    def inflight(self, model: str) -> Any:
        child = self._inflight.get(model)
        if child is None:
            child = self._inflight[model] = self._metrics.inflight.labels(model)
        return child


class Call:
    """Request metrics of one inference request: in-flight gauge, count by code, duration.

    The model labels stay empty until `bind` names a model the server knows, so requests
    for made-up names cannot grow the label sets without bound.
    """

    __slots__ = ("_api", "_bound", "_context", "_metrics", "_started", "model", "version")

    def __init__(
        self,
        metrics: RequestMetrics,
        api: str,
        context: grpc.aio.ServicerContext | None = None,
    ) -> None:
        self._metrics = metrics
        self._api = api
        self._context = context
        self.model = ""
        self.version = ""
        self._bound = False
        self._started = time.perf_counter()

    def bind(self, model: str, version: str = "") -> None:
        if not self._bound:
            self._bound = True
            self._metrics.inflight(model).inc()
        self.model, self.version = model, version

    def __enter__(self) -> Call:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        code = "OK" if exc is None else outcome(exc, self._context)
        m = self._metrics
        m.count(self.model, self.version, self._api, code).inc()
        m.duration(self.model, self.version).observe(time.perf_counter() - self._started)
        if self._bound:
            m.inflight(self.model).dec()
