"""Streaming modes of the load generator: workers share a few long-lived bidirectional streams.

Each worker still sees a `Call` (send one request, await its answer's code), so the unary
worker loop measures streams too: a stream carries its workers' requests tagged with ids, and
one reader per stream hands each answer, in whatever order it comes, to the worker waiting on
that id.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from benchmarks.calls import ModelInfo, error_code, kserve_request, native_request
from benchmarks.common import Config

# A KServe stream answer reports a failure as text only (tritonclient's semantics), no code.
KSERVE_STREAM_ERROR = "STREAM_ERROR"
# Seconds a closing stream may take to deliver its last answers before it is cancelled.
CLOSE_GRACE_S = 2.0

Answer = tuple[str, str]  # (request id, status code name)


@dataclass(frozen=True)
class StreamApi:
    """What a stream sends and how its answers read; requests travel pre-serialized."""

    method: str
    # The request without its id, serialized once: a protobuf message followed by another
    # one's bytes parses as their merge, so appending `tag(id)` sets the id without copying
    # (and re-encoding) the pixels per request.
    payload: bytes
    tag: Callable[[str], bytes]
    answer: Callable[[bytes], Answer]


def _method(service: object, name: str) -> str:
    return f"/{service.full_name}/{name}"  # type: ignore[attr-defined]


def native_stream_api(config: Config, model: ModelInfo) -> StreamApi:
    from wire import classifier_pb2 as pb

    def answer(data: bytes) -> Answer:
        reply = pb.ClassifyStreamResponse.FromString(data)
        code = (reply.error.code or "UNKNOWN") if reply.HasField("error") else "OK"
        return reply.id, code

    return StreamApi(
        method=_method(pb.DESCRIPTOR.services_by_name["Classifier"], "ClassifyStream"),
        payload=native_request(config, model).SerializeToString(),
        tag=lambda request_id: pb.ClassifyRequest(id=request_id).SerializeToString(),
        answer=answer,
    )


def kserve_stream_api(config: Config, model: ModelInfo) -> StreamApi:
    from tritonclient.grpc import service_pb2 as pb

    def answer(data: bytes) -> Answer:
        reply = pb.ModelStreamInferResponse.FromString(data)
        return reply.infer_response.id, KSERVE_STREAM_ERROR if reply.error_message else "OK"

    return StreamApi(
        method=_method(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], "ModelStreamInfer"),
        payload=kserve_request(config, model).SerializeToString(),
        tag=lambda request_id: pb.ModelInferRequest(id=request_id).SerializeToString(),
        answer=answer,
    )


class Stream:
    """One stream shared by several workers; a stream that broke is reopened by the next call.

    Reopening is what a real client does, and keeps a broken stream from answering its workers
    at once in a busy loop. `timeout` bounds each request, `lifetime` the stream as a whole.
    """

    def __init__(
        self, channel: grpc.aio.Channel, api: StreamApi, timeout: float, lifetime: float
    ) -> None:
        self._open_rpc = channel.stream_stream(api.method, response_deserializer=api.answer)
        self._api = api
        self._timeout = timeout
        self._lifetime = lifetime
        self._ids = itertools.count()
        self._open()

    def _open(self) -> None:
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[str]] = {}
        self._rpc = self._open_rpc(_drain(self._outbox), timeout=self._lifetime)
        self._reader = asyncio.ensure_future(_read(self._rpc, self._pending))

    async def call(self) -> str:
        if self._reader.done():
            self._outbox.put_nowait(None)
            self._open()
        request_id = str(next(self._ids))
        waiter = asyncio.get_running_loop().create_future()
        pending = self._pending
        pending[request_id] = waiter
        self._outbox.put_nowait(self._api.payload + self._api.tag(request_id))
        try:
            return await asyncio.wait_for(waiter, self._timeout)
        except TimeoutError:
            return grpc.StatusCode.DEADLINE_EXCEEDED.name
        finally:
            pending.pop(request_id, None)

    async def close(self) -> None:
        """Half-close, let the server finish, cancel if it does not in time."""
        self._outbox.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), CLOSE_GRACE_S)
        except TimeoutError:
            pass
        finally:
            self._rpc.cancel()
            self._reader.cancel()


async def _drain(outbox: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    while (request := await outbox.get()) is not None:
        yield request


async def _read(rpc: grpc.aio.StreamStreamCall, pending: dict[str, asyncio.Future[str]]) -> None:
    """Hand each answer to its waiter; when the stream ends, every waiter left gets its code."""
    code = grpc.StatusCode.UNKNOWN.name  # the server ended the stream with requests unanswered
    try:
        async for request_id, answer_code in rpc:
            waiter = pending.pop(request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(answer_code)
    except grpc.RpcError as error:
        code = error_code(error)
    for waiter in pending.values():
        if not waiter.done():
            waiter.set_result(code)
