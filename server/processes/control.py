"""The control channel between the worker processes of one server (proto/wire/control.proto).

Each worker answers it on a Unix socket, `worker-N.sock` in the supervisor's run folder,
which only the server's user can open (mode 0700): never on a network port, so it takes no
tokens. `LocalWorker` is this worker's side of every control call, used both by the channel's
servicer and by this worker's own server.processes.cluster; `RemoteWorker` makes the same calls on
another worker, so server.processes.cluster treats every worker alike.

Core errors cross the channel by name (trailing metadata `x-error`), so a peer's
ModelUnavailableError is raised here as one, and is told apart from a peer that is gone.

A peer counts as gone exactly while nothing listens on its socket. gRPC would say so for up
to its reconnect backoff after the peer came up (a channel that failed to connect fails every
call fast until its next attempt), and workers start together, so each dials some peers
before they listen: the server said ready while a worker still found a peer gone and refused
model control. A call on a channel in that backoff is made on a new channel instead, which
connects at once (a Unix socket answers a connect immediately, yes or no).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from server import errors
from server.core.manager import PreparedLoad
from server.core.overrides import OverrideFolders
from server.core.statistics import local_statistics
from server.observability import tracing
from server.observability.exemplars import Exemplar
from wire import control_pb2 as pb
from wire import control_pb2_grpc
from wire import grpc_service_pb2 as inference_pb

log = logging.getLogger(__name__)

ERROR_KEY = "x-error"
# A prepared load whose coordinator never commits nor aborts (it died) is dropped after this,
# freeing the model's lock.
PREPARED_TTL_S = 120.0
# How long a peer may take to answer a question about its state; past it, it counts as
# unknown (not ready). Loads take as long as loading takes.
STATUS_TIMEOUT_S = 2.0
CHANGE_TIMEOUT_S = 60.0
LOAD_TIMEOUT_S = 600.0
# gRPC's own reconnects in the background, while nobody calls; a call does not wait for them
# (RemoteWorker._stub).
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
_ERRORS: dict[str, type[errors.ServingError]] = {
    cls.__name__: cls for cls in errors.ServingError.__subclasses__()
}

T = TypeVar("T")


def socket_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.sock"


class WorkerGone(Exception):
    """A peer that did not answer: not running, restarting, or too busy to answer in time."""

    def __init__(self, index: int, reason: str, absent: bool) -> None:
        super().__init__(f"worker {index} did not answer: {reason}")
        self.index = index
        # True when nothing listens (the worker is down): it has no ports either.
        self.absent = absent


class LocalWorker:
    """This worker as the control channel and server.processes.cluster see it."""

    def __init__(self, state: Any, index: int = 0) -> None:
        self.state = state  # server.api.common.ApiState
        self.index = index
        self.accepting = False  # client ports bound
        self.started = False  # start-up load finished
        self.whole = False  # every worker was seen ready at once (server.processes.cluster)
        # Called when another worker's states changed (health statuses are recomputed).
        self.on_peer_change: Callable[[], Awaitable[None]] | None = None
        self._prepared: dict[str, tuple[PreparedLoad, asyncio.TimerHandle]] = {}
        self._expiring: set[asyncio.Task[None]] = set()

    @property
    def overrides(self) -> OverrideFolders:
        """The folder of loads' overrides, the same for every worker (server.core.overrides)."""
        overrides: OverrideFolders = self.state.manager.overrides
        return overrides

    async def status(self) -> pb.WorkerStatus:
        entry = inference_pb.RepositoryIndexResponse.ModelIndex
        return pb.WorkerStatus(
            index=self.index,
            pid=os.getpid(),
            accepting=self.accepting,
            started=self.started,
            ready=self.state.ready,
            draining=self.state.draining,
            whole=self.whole,
            models=[
                entry(name=s.name, version=s.version, state=s.state, reason=s.reason)
                for s in self.state.manager.index()
            ],
        )

    async def statistics(self, name: str, version: str) -> list[inference_pb.ModelStatistics]:
        return local_statistics(self.state.manager, name, version)

    async def prepare(self, name: str, override: Path | None = None) -> pb.PrepareResponse:
        prepared = await self.state.manager.prepare(name, override)
        loop = asyncio.get_running_loop()
        expiry = loop.call_later(PREPARED_TTL_S, self._expire, prepared)
        self._prepared[name] = (prepared, expiry)
        failure = "; ".join(f"version {v}: {r}" for v, r in sorted(prepared.failures.items()))
        return pb.PrepareResponse(versions=prepared.versions, failure=failure)

    async def commit(self, name: str) -> None:
        await self.state.manager.commit(self._take(name))

    async def abort(self, name: str) -> None:
        await self.state.manager.abort(self._take(name))

    async def unload(self, name: str) -> bool:
        try:
            await self.state.manager.unload(name)
        except errors.ModelNotFoundError:
            return False
        return True

    async def changed(self) -> None:
        if self.on_peer_change is not None:
            await self.on_peer_change()

    async def exemplars(self) -> list[Exemplar]:
        active = tracing.ACTIVE
        return active.exemplars.snapshot() if active is not None else []

    def _take(self, name: str) -> PreparedLoad:
        entry = self._prepared.pop(name, None)
        if entry is None:
            raise errors.ModelUnavailableError(
                f"model {name!r}: no load of it is prepared on worker {self.index} "
                "(it was dropped after waiting too long, or never prepared)"
            )
        prepared, expiry = entry
        expiry.cancel()
        return prepared

    def _expire(self, prepared: PreparedLoad) -> None:
        if self._prepared.get(prepared.name, (None,))[0] is prepared:
            del self._prepared[prepared.name]
            log.warning("model %s: prepared load never committed; dropped", prepared.name)
            task = asyncio.ensure_future(self.state.manager.abort(prepared))
            self._expiring.add(task)
            task.add_done_callback(self._expiring.discard)


def _answers(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Core errors become a status with the error's name in `x-error`; others INTERNAL."""

    @functools.wraps(method)
    async def wrapped(self: ControlServicer, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await method(self, request, context)
        except errors.ServingError as exc:
            # The caller raises the same error again from its name; the code only marks it.
            context.set_trailing_metadata(((ERROR_KEY, type(exc).__name__),))
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        except Exception:
            log.exception("control call %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed")
        raise AssertionError("abort returns by raising")  # pragma: no cover

    return wrapped


class ControlServicer(control_pb2_grpc.ControlServicer):
    def __init__(self, worker: LocalWorker) -> None:
        self._worker = worker

    @_answers
    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.WorkerStatus:
        return await self._worker.status()

    @_answers
    async def Statistics(
        self, request: inference_pb.ModelStatisticsRequest, context: Any
    ) -> inference_pb.ModelStatisticsResponse:
        stats = await self._worker.statistics(request.name, request.version)
        return inference_pb.ModelStatisticsResponse(model_stats=stats)

    @_answers
    async def Prepare(self, request: pb.ModelRequest, context: Any) -> pb.PrepareResponse:
        override = Path(request.override) if request.override else None
        return await self._worker.prepare(request.name, override)

    @_answers
    async def Commit(self, request: pb.ModelRequest, context: Any) -> pb.CommitResponse:
        await self._worker.commit(request.name)
        return pb.CommitResponse()

    @_answers
    async def Abort(self, request: pb.ModelRequest, context: Any) -> pb.AbortResponse:
        await self._worker.abort(request.name)
        return pb.AbortResponse()

    @_answers
    async def Unload(self, request: pb.ModelRequest, context: Any) -> pb.UnloadResponse:
        return pb.UnloadResponse(unloaded=await self._worker.unload(request.name))

    @_answers
    async def Changed(self, request: pb.ChangedRequest, context: Any) -> pb.ChangedResponse:
        await self._worker.changed()
        return pb.ChangedResponse()

    @_answers
    async def Exemplars(self, request: pb.ExemplarsRequest, context: Any) -> pb.ExemplarsResponse:
        found = await self._worker.exemplars()
        return pb.ExemplarsResponse(exemplars=[_exemplar_message(e) for e in found])


def _exemplar_message(e: Exemplar) -> pb.Exemplar:
    return pb.Exemplar(
        metric=e.metric, labels=dict(e.labels), le=e.le, value=e.value,
        timestamp=e.timestamp, trace_id=e.trace_id, span_id=e.span_id,
    )  # fmt: skip


def _exemplar(m: pb.Exemplar) -> Exemplar:
    labels = tuple(sorted(m.labels.items()))
    return Exemplar(m.metric, labels, m.le, m.value, m.timestamp, m.trace_id, m.span_id)


async def serve_control(worker: LocalWorker, path: Path) -> grpc.aio.Server:
    """Start the control channel of `worker` on the Unix socket `path` (replacing a stale one)."""
    path.unlink(missing_ok=True)  # left by this worker's previous life
    server = grpc.aio.server()
    control_pb2_grpc.add_ControlServicer_to_server(ControlServicer(worker), server)
    if not server.add_insecure_port(f"unix:{path}"):
        raise OSError(f"cannot listen on {path}")
    await server.start()
    return server


class RemoteWorker:
    """Another worker, called over its control socket; raises WorkerGone when it cannot answer."""

    def __init__(self, index: int, path: Path) -> None:
        self.index = index
        self._target = f"unix:{path}"
        self._channel = grpc.aio.insecure_channel(self._target, options=_CHANNEL_OPTIONS)
        self._control = control_pb2_grpc.ControlStub(self._channel)
        self._retired: set[asyncio.Task[None]] = set()  # channels replaced, closing
        # Whether its client ports took connections when it last answered (False once it is
        # found gone): what a status call that times out is taken to mean.
        self.accepting = False

    async def status(self) -> pb.WorkerStatus:
        try:
            status = await self._call("Status", pb.StatusRequest(), STATUS_TIMEOUT_S)
        except WorkerGone as exc:
            if exc.absent:
                self.accepting = False
            raise
        self.accepting = status.accepting
        return status

    async def statistics(self, name: str, version: str) -> list[inference_pb.ModelStatistics]:
        request = inference_pb.ModelStatisticsRequest(name=name, version=version)
        response = await self._call("Statistics", request, STATUS_TIMEOUT_S)
        return list(response.model_stats)

    async def prepare(self, name: str, override: Path | None = None) -> pb.PrepareResponse:
        request = pb.ModelRequest(name=name, override=str(override or ""))
        return await self._call("Prepare", request, LOAD_TIMEOUT_S)

    async def commit(self, name: str) -> None:
        await self._call("Commit", pb.ModelRequest(name=name), CHANGE_TIMEOUT_S)

    async def abort(self, name: str) -> None:
        await self._call("Abort", pb.ModelRequest(name=name), CHANGE_TIMEOUT_S)

    async def unload(self, name: str) -> bool:
        request = pb.ModelRequest(name=name)
        response = await self._call("Unload", request, CHANGE_TIMEOUT_S)
        return response.unloaded

    async def changed(self) -> None:
        await self._call("Changed", pb.ChangedRequest(), STATUS_TIMEOUT_S)

    async def exemplars(self) -> list[Exemplar]:
        response = await self._call("Exemplars", pb.ExemplarsRequest(), STATUS_TIMEOUT_S)
        return [_exemplar(m) for m in response.exemplars]

    async def close(self) -> None:
        await self._channel.close()
        await asyncio.gather(*self._retired)

    def _stub(self) -> control_pb2_grpc.ControlStub:
        """A stub on a channel that connects now: the current one, or a new one when the current
        one waits out its reconnect backoff (module doc). The old one closes once its calls,
        failing fast, are done."""
        if self._channel.get_state() is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            old = self._channel
            self._channel = grpc.aio.insecure_channel(self._target, options=_CHANNEL_OPTIONS)
            self._control = control_pb2_grpc.ControlStub(self._channel)
            closing = asyncio.ensure_future(old.close(grace=STATUS_TIMEOUT_S))
            self._retired.add(closing)
            closing.add_done_callback(self._retired.discard)
        return self._control

    async def _call(self, method: str, request: Any, timeout: float) -> Any:
        try:
            return await getattr(self._stub(), method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            name = dict(exc.trailing_metadata() or ()).get(ERROR_KEY)
            error = _ERRORS.get(name) if isinstance(name, str) else None
            if error is not None:
                raise error(exc.details() or name) from None
            absent = exc.code() == grpc.StatusCode.UNAVAILABLE
            raise WorkerGone(self.index, exc.details() or exc.code().name, absent) from None
