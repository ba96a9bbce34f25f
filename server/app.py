"""Assembles the server: metrics HTTP, the gRPC server and its services, the HTTP/REST API,
signals, draining.

Start order: the gRPC and HTTP ports are bound and answering before models load, so liveness
(ServerLive, health "" NOT_SERVING, GET /v2/health/live) answers during a long load and
orchestrators can tell "starting" from "dead"; readiness turns true once every model asked
for is ready. Shutdown (SIGTERM/SIGINT): health NOT_SERVING and readiness false at once, new
inference answers UNAVAILABLE, the gRPC and HTTP servers stop taking calls and give those in
flight what is left of grace_period_s to finish, then the batchers finish their accepted work
and the runtimes close within what is left of it after that: the whole stop fits in the grace
period. A load in progress is abandoned at its next step. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import disable_created_metrics

from server.api import classifier, inference, security, status, transport
from server.api.common import ApiState
from server.api.health import Health, enable_reflection
from server.api.kserve import KServe
from server.api.rest import handlers as rest_handlers
from server.api.rest.app import RestServer
from server.api.traced import RpcNames
from server.config import Settings
from server.core.loading import SYNTHETIC_WARNING
from server.core.manager import ModelManager
from server.core.overrides import OverrideFolders
from server.core.served import ServedModel
from server.errors import StartupError
from server.observability import tracing, tracing_config
from server.observability.exemplars import Exemplar
from server.observability.metrics import Metrics
from server.processes.cluster import Cluster
from server.processes.contract import BOUND, WorkerRole
from server.processes.contract import STARTED as WORKER_STARTED
from server.processes.control import LocalWorker, RemoteWorker, serve_control, socket_path
from server.startlines import hostport, http_url, listening_line, started_line

log = logging.getLogger("server")

# The lock file in the supervisor's run folder that serializes model control
# (server.processes.cluster).
CONTROL_LOCK = "control.lock"
# Loads' override folders, in the run folder: every worker loads from them.
OVERRIDES = "overrides"
# How long a stopping server keeps answering new calls with UNAVAILABLE before it closes.
REFUSE_BEFORE_STOP_S = 0.25
# The least any step of the stop waits, even once the grace period is spent: the batchers'
# accepted work usually ends within it, so a grace period of 0 still closes the models.
MIN_STOP_STEP_S = 0.05
# How long a scrape waits for the workers' exemplars before it is served without them.
EXEMPLARS_TIMEOUT_S = 3.0
# Young-generation collections run after this many more container objects were made than
# freed (CPython's default, 700, is below what the requests in flight hold under load, so it
# collected every couple of dozen requests and found almost nothing: docs/benchmarks.md).
GC_YOUNG_THRESHOLD = 20_000
# Logged once start-up has finished (models loaded or failed): scripts and tests wait for it.
API_SERVICES = (inference.WIRE_SERVICE, "imgserve.classifier.v1.Classifier")


NULL_COMPUTE_WARNING = (
    "--null-compute is on: models are NOT run, every answer is uniform probabilities "
    "(a benchmarking setting: it measures the transport and batcher alone)"
)


async def serve(settings: Settings, role: WorkerRole | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status. Raises StartupError.

    `role`: this process is one worker of several (server.worker); None for a lone server.
    """
    repository = settings.model_repository
    if not repository.is_dir():
        raise StartupError(
            f"model repository {repository} is not a directory; build one with "
            f"`python -m training build-repository --model-repository {repository}`"
        )
    if role is not None:  # the ports the supervisor reserved: every worker shares them
        settings = replace(
            settings,
            grpc_port=role.grpc_port,
            metrics_port=role.metrics_port,
            http_port=role.http_port,
            disable_http=settings.disable_http or not role.http_port,
        )
    try:  # before the models load: their batchers see whether tracing is on
        tracing.install(tracing_config.config_from(settings), role.index if role else None)
    except tracing_config.TracingConfigError as exc:
        raise StartupError(f"tracing: {exc}") from None
    # `*_created` series double the metrics page and no dashboard reads them. The switch is
    # process-wide, so it belongs to the process that serves, not to each Metrics().
    disable_created_metrics()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    # Each serving version's request series exist from the start, per front-end that counts them.
    apis = (inference.API_LABEL, classifier.API_LABEL)
    metrics = Metrics(apis if settings.disable_http else (*apis, rest_handlers.API_LABEL))
    if role is not None and role.restart_cause is not None:
        metrics.worker_restarts.inc()  # the supervisor logged the cause
    server = _Server(settings, metrics, role)
    try:
        return await server.run()
    finally:
        server.close_metrics()
        tracing.uninstall()  # sends the last spans (bounded: tracing.FLUSH_TIMEOUT_S)


class _Server:
    """One serving process: a lone server, or one worker of several.

    A lone server and a first-start worker bind their ports before loading models, so
    liveness answers during a long load; a restarted worker loads first (what the others
    serve), so no connection reaches it before it can answer (server.processes.cluster).
    """

    def __init__(self, settings: Settings, metrics: Metrics, role: WorkerRole | None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.role = role
        overrides = OverrideFolders(role.run_path / OVERRIDES) if role is not None else None
        self.manager = ModelManager(settings, metrics, overrides)
        self.state = ApiState(self.manager, metrics)
        self.local = LocalWorker(self.state, role.index if role else 0)
        peers, lock = [], None
        if role is not None:
            others = (i for i in range(role.count) if i != role.index)
            peers = [RemoteWorker(i, socket_path(role.run_path, i)) for i in others]
            lock = role.run_path / CONTROL_LOCK
        self.state.cluster = Cluster(self.local, peers, lock)
        self.health = Health(self.state, API_SERVICES)
        self.local.on_peer_change = self.health.refresh
        self.kserve = KServe(self.state, self.health, settings.enable_model_control)
        self.httpd: WSGIServer | None = None
        self.rest: RestServer | None = None
        self.grpc_at = ""
        self.rest_url = ""  # the HTTP/REST URL once bound ("" while unbound or off)

    def close_metrics(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    async def run(self) -> int:
        settings, role = self.settings, self.role
        try:
            guard = security.load(settings, self.metrics.auth_rejections)
        except security.SecurityConfigError as exc:
            raise StartupError(str(exc)) from None
        server = self._grpc_server(guard)
        if not settings.disable_http:
            # In-flight HTTP calls get the grace period less the moment new calls are refused.
            grace = settings.grace_period_s
            self.rest = RestServer(
                self.state,
                self.kserve,
                guard,
                max_body_bytes=settings.max_message_bytes,
                shutdown_timeout=max(grace - min(REFUSE_BEFORE_STOP_S, grace / 4), MIN_STOP_STEP_S),
            )
        self.metrics.watch_event_loop(asyncio.get_running_loop())
        stop = asyncio.Event()
        _on_signals(stop)
        control = None
        if role is not None:
            status.name_worker(role.index)
            role.watch_lifeline(lambda: _supervisor_gone(stop))
            control = await serve_control(self.local, socket_path(role.run_path, role.index))
        if settings.null_compute:
            log.warning(NULL_COMPUTE_WARNING)
        try:
            return await self._run(server, guard, stop)
        finally:
            if control is not None:
                await control.stop(None)
            await self.state.cluster.close()

    async def _run(
        self, server: grpc.aio.Server, guard: security.Security, stop: asyncio.Event
    ) -> int:
        role = self.role
        restarted = role is not None and role.restarted
        if not restarted:
            await self._open(server, guard)
        await self.health.refresh()  # "" is NOT_SERVING until the models are loaded
        starting = asyncio.create_task(self._start(server, guard), name="load models")
        stopping = asyncio.create_task(stop.wait(), name="wait for a signal")
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        exit_status = 0
        if starting.done():
            if starting.exception() is not None:
                exc = starting.exception()
                if isinstance(exc, StartupError):
                    raise exc
                log.error("loading the models failed", exc_info=exc)
                stop.set()
                exit_status = 1
            else:
                self._report()
        await stopping
        return await self._stop(server, starting, exit_status)

    async def _open(self, server: grpc.aio.Server, guard: security.Security) -> None:
        """Bind the client ports (gRPC and metrics) and start answering on them."""
        settings, role = self.settings, self.role
        exemplars = None
        if tracing.ACTIVE is not None:
            exemplars = _exemplar_fetcher(self.state.cluster, asyncio.get_running_loop())
        try:
            self.httpd, _, metrics_port = self.metrics.serve_http(
                settings.host, settings.metrics_port, reuse_port=role is not None,
                exemplars=exemplars,
            )  # fmt: skip
        except OSError as exc:
            where = hostport(settings.host, settings.metrics_port)
            raise StartupError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None
        address = hostport(settings.host, settings.grpc_port)
        try:
            grpc_port = guard.add_port(server, address)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen for gRPC on {address}: {exc}") from None
        if not grpc_port:
            raise StartupError(f"cannot listen for gRPC on {address} (is the port in use?)")
        rest_url = self.rest_url = await self._open_rest()
        await server.start()
        self.local.accepting = True
        self.grpc_at = hostport(settings.host, grpc_port)
        metrics_at = hostport(settings.host, metrics_port)
        if role is None:
            log.info(
                "%s; loading models from %s",
                listening_line(self.grpc_at, metrics_at, rest_url), settings.model_repository,
            )  # fmt: skip
        else:
            role.notify(BOUND)

    async def _open_rest(self) -> str:
        """Bind and start the HTTP/REST port; its URL ("" when it is off)."""
        settings = self.settings
        if self.rest is None:
            return ""
        try:
            port = await self.rest.start(
                settings.host, settings.http_port, reuse_port=self.role is not None
            )
        except OSError as exc:
            where = hostport(settings.host, settings.http_port)
            raise StartupError(
                f"cannot listen for HTTP on {where}: {exc.strerror or exc}"
            ) from None
        return http_url(settings, port)

    async def _start(self, server: grpc.aio.Server, guard: security.Security) -> None:
        """Load the models; a restarted worker loads what the others serve, then opens."""
        names = None
        if self.role is not None and self.role.restarted:
            names = await self.state.cluster.served_names()
        await self.manager.start(on_change=self._changed, names=names)
        if self.state.draining:  # stopped while loading: a restarted worker never opens
            return
        if not self.local.accepting:
            await self._open(server, guard)
        self.local.started = True
        self.metrics.workers.set(1)
        # What start-up built (modules, models, descriptors) lives as long as the process:
        # out of the collector's sight, a full collection no longer walks all of it.
        gc.freeze()
        await self._changed()

    async def _changed(self) -> None:
        """This worker's models changed: recompute health, and tell the other workers."""
        await self.health.refresh()
        if self.state.cluster.peers:
            await self.state.cluster.announce()

    def _grpc_server(self, guard: security.Security) -> grpc.aio.Server:
        settings = self.settings
        limits = tuple(
            (f"grpc.max_{way}_message_length", settings.max_message_bytes)
            for way in ("receive", "send")
        )
        # A worker joins the SO_REUSEPORT group of the port the supervisor reserved; a lone
        # server refuses to share its port (Linux would let a second server bind it silently).
        reuse = (("grpc.so_reuseport", 1 if self.role is not None else 0),)
        interceptors = guard.interceptors
        if tracing.ACTIVE is not None:  # the traced calls name their spans after the RPC
            interceptors = (*interceptors, RpcNames())
        chosen = transport.choose(settings)
        log.info(chosen.line())
        server = chosen.server(options=(*reuse, *limits), interceptors=interceptors)
        transport.register(
            server,
            [
                *inference.services(inference.InferenceServicer(self.state, self.kserve)),
                classifier.service(classifier.ClassifierServicer(self.state)),
            ],
        )
        self.health.add_to_server(server)
        enable_reflection(server, API_SERVICES)
        return server

    async def _stop(
        self, server: grpc.aio.Server, starting: asyncio.Task[None], status: int
    ) -> int:
        settings, state, manager = self.settings, self.state, self.manager
        began, grace = time.monotonic(), settings.grace_period_s

        def left() -> float:
            """What is left of the grace period: each step of the stop waits at most that."""
            return max(grace - (time.monotonic() - began), MIN_STOP_STEP_S)

        log.info("stopping: refusing new requests, finishing those accepted (up to %gs)", grace)
        state.draining = True
        await self.health.drain()
        # close() first when models are still loading: it tells the load thread to give up at
        # its next step; the RPCs in flight are answered by the batchers it lets finish.
        closing = None if starting.done() else asyncio.ensure_future(manager.close())
        # gRPC cancels (CANCELLED, which clients do not retry) the calls that reached it but
        # not yet a handler when the server stops; for a moment first, new calls are still
        # taken and refused with UNAVAILABLE, so callers under load learn to go elsewhere.
        if self.local.accepting:  # a restarted worker stopped while loading never opened
            await asyncio.sleep(min(REFUSE_BEFORE_STOP_S, grace / 4))
            stopping = [transport.stop(server, left())]
            if self.rest is not None:
                stopping.append(self.rest.stop())
            await asyncio.gather(*stopping)
        if closing is None:
            closing = asyncio.ensure_future(manager.close())
        try:
            await asyncio.wait_for(asyncio.gather(closing, _finish(starting)), timeout=left())
        except TimeoutError:  # builtin TimeoutError only from Python 3.11
            log.warning("models did not close within the grace period; exiting anyway")
        log.info("stopped after %.2fs", time.monotonic() - began)
        return status

    def _report(self) -> None:
        """One line per model, then whether this server (or worker) is ready."""
        manager, role = self.manager, self.role
        served = manager.served()
        if role is None or (role.index == 0 and not role.restarted):
            _report_models(manager)
        example = served[0].name if served else "MODEL"
        if role is None:
            ready = self.state.ready
            log.info(started_line(len(served), ready, self.grpc_at, example, self.rest_url))
            return
        log.info(
            "worker %d (pid %d) %s: %d model version(s) serving%s",
            role.index, os.getpid(), "restarted" if role.restarted else "started", len(served),
            "" if self.state.ready else " (NOT ready: see the models' states)",
        )  # fmt: skip
        role.notify(WORKER_STARTED, served=len(served), ready=self.state.ready, example=example)


def _exemplar_fetcher(
    cluster: Cluster, loop: asyncio.AbstractEventLoop
) -> Callable[[], list[Exemplar]]:
    """What the /metrics thread calls for every worker's exemplars: asked on the event loop
    (the control channel lives there); a scrape never waits past EXEMPLARS_TIMEOUT_S."""

    def fetch() -> list[Exemplar]:
        future = asyncio.run_coroutine_threadsafe(cluster.exemplars(), loop)
        try:
            return future.result(EXEMPLARS_TIMEOUT_S)
        except TimeoutError:
            future.cancel()
            log.warning("exemplars not gathered within %gs: scrape served without them",
                        EXEMPLARS_TIMEOUT_S)  # fmt: skip
            return []

    return fetch


def _supervisor_gone(stop: asyncio.Event) -> None:
    if not stop.is_set():
        log.warning("the supervisor is gone: stopping")
        stop.set()


async def _finish(starting: asyncio.Task[None]) -> None:
    """Wait for start() to give up (it stops at the load's next step); its outcome is logged."""
    with contextlib.suppress(Exception):
        await starting


def _on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def handle(signum: int) -> None:
        if stop.is_set():  # the operator will not wait for the graceful stop
            log.warning("%s received again: exiting now", signal.Signals(signum).name)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(128 + signum)
        else:
            log.info("%s received", signal.Signals(signum).name)
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, handle, signum)


def _interface(model: ServedModel) -> str:
    """An image classifier's input and classes; any other model's tensors."""
    if model.image is not None and model.image.layout == "NCHW" and model.signature.batched:
        c, h, w = model.input_shape
        return f"input [N,{c},{h},{w}], {model.num_classes} classes"
    signature = model.signature
    tensors = ", ".join(
        f"{t.name} {t.datatype.name} [{','.join(map(str, t.shown_dims(signature.batched)))}]"
        for t in signature.inputs
    )
    classes = f", {model.num_classes} classes" if model.image is not None else ""
    return f"inputs {tensors}{classes}"


def _report_models(manager: ModelManager) -> None:
    """One line per model: its version serving, or why it does not."""
    served = {(m.name, str(m.version)): m for m in manager.served()}
    for model in manager.index():
        one = served.get((model.name, model.version))
        if one is not None:
            log.log(
                logging.WARNING if one.synthetic else logging.INFO,
                "model %s version %s: READY (%s on %s, %s%s)",
                model.name, model.version, one.platform, one.device, _interface(one),
                f"; {SYNTHETIC_WARNING}" if one.synthetic else "",
            )  # fmt: skip
        else:
            version = f" version {model.version}" if model.version else ""
            log.warning("model %s%s: %s: %s", model.name, version, model.state, model.reason)
