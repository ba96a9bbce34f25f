"""Assembles the server: metrics HTTP, the gRPC server and its services, signals, draining.

Start order: the gRPC port is bound and answering before models load, so liveness
(ServerLive, health "" NOT_SERVING) answers during a long load and orchestrators can tell
"starting" from "dead"; ServerReady and health turn true once every model asked for is ready.
Shutdown (SIGTERM/SIGINT): health NOT_SERVING and ServerReady false at once, new inference
answers UNAVAILABLE, the gRPC server stops taking RPCs and gives those in flight what is left
of grace_period_s to finish, then the batchers finish their accepted work and the runtimes
close within what is left of it after that: the whole stop fits in the grace period.
A load in progress is abandoned at its next step. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import time

import grpc
from prometheus_client import disable_created_metrics

from server import security
from server.api import classifier, inference
from server.api.common import ApiState
from server.api.health import Health, enable_reflection
from server.config import Settings
from server.loading import SYNTHETIC_WARNING
from server.manager import ModelManager
from server.metrics import Metrics

log = logging.getLogger("server")

GRPC_OPTIONS = (
    # Without this, Linux lets a second server bind the same port and share its traffic.
    ("grpc.so_reuseport", 0),
)
# How long a stopping server keeps answering new calls with UNAVAILABLE before it closes.
REFUSE_BEFORE_STOP_S = 0.25
# The least any step of the stop waits, even once the grace period is spent: the batchers'
# accepted work usually ends within it, so a grace period of 0 still closes the models.
MIN_STOP_STEP_S = 0.05
# Logged once start-up has finished (models loaded or failed): scripts and tests wait for it.
STARTED = "startup complete"
API_SERVICES = (inference.WIRE_SERVICE, "imgserve.classifier.v1.Classifier")
# Logged once the ports are bound: "serving on grpc HOST:PORT metrics http://HOST:PORT/metrics; ..."
# Scripts read the ports chosen for port 0 from it with parse_listening().
LISTENING_PREFIX = "serving on grpc "
_LISTENING = re.compile(
    re.escape(LISTENING_PREFIX)
    + r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^\s:\[\]]+)):(?P<grpc>\d+)"
    + r" metrics http://(?:\[[^\]]*\]|[^\s:\[\]]+):(?P<metrics>\d+)/metrics"
)


NULL_COMPUTE_WARNING = (
    "--null-compute is on: models are NOT run, every answer is uniform probabilities "
    "(a benchmarking setting: it measures the transport and batcher alone)"
)


class StartupError(Exception):
    """The server cannot start (bad repository, port in use); str() is the one-line reason."""


def hostport(host: str, port: int) -> str:
    """HOST:PORT with an IPv6 host in brackets, as gRPC dials it and the server logs it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_listening(line: str) -> tuple[str, int, int] | None:
    """(gRPC host, gRPC port, metrics port) from the server's "serving on grpc ..." log line.

    Works on text and JSON log lines; the host comes without IPv6 brackets (hostport() adds
    them back). None for any other line.
    """
    match = _LISTENING.search(line)
    if match is None:
        return None
    return match["v6"] or match["host"], int(match["grpc"]), int(match["metrics"])


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status. Raises StartupError."""
    repository = settings.model_repository
    if not repository.is_dir():
        raise StartupError(
            f"model repository {repository} is not a directory; build one with "
            f"`python -m training build-repository --model-repository {repository}`"
        )
    # `*_created` series double the metrics page and no dashboard reads them. The switch is
    # process-wide, so it belongs to the process that serves, not to each Metrics().
    disable_created_metrics()
    metrics = Metrics()
    try:
        httpd, _, metrics_port = metrics.serve_http(settings.host, settings.metrics_port)
    except OSError as exc:
        where = hostport(settings.host, settings.metrics_port)
        raise StartupError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None
    try:
        return await _serve(settings, metrics, metrics_port)
    finally:
        httpd.shutdown()
        httpd.server_close()


async def _serve(settings: Settings, metrics: Metrics, metrics_port: int) -> int:
    metrics.watch_event_loop(asyncio.get_running_loop())
    manager = ModelManager(settings, metrics)
    state = ApiState(manager, metrics)
    health = Health(state, API_SERVICES)
    try:
        guard = security.load(settings, metrics.auth_rejections)
    except security.SecurityConfigError as exc:
        raise StartupError(str(exc)) from None
    limits = tuple(
        (f"grpc.max_{way}_message_length", settings.max_message_bytes)
        for way in ("receive", "send")
    )
    server = grpc.aio.server(options=(*GRPC_OPTIONS, *limits), interceptors=guard.interceptors)
    server.add_generic_rpc_handlers(
        [
            *inference.handlers(
                inference.InferenceServicer(state, health, settings.enable_model_control)
            ),
            classifier.handler(classifier.ClassifierServicer(state)),
        ]
    )
    health.add_to_server(server)
    enable_reflection(server, API_SERVICES)
    address = hostport(settings.host, settings.grpc_port)
    try:
        grpc_port = guard.add_port(server, address)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen for gRPC on {address}: {exc}") from None
    if not grpc_port:
        raise StartupError(f"cannot listen for gRPC on {address} (is the port in use?)")

    if settings.null_compute:
        log.warning(NULL_COMPUTE_WARNING)
    await health.refresh()  # "" is NOT_SERVING until the models are loaded
    await server.start()
    grpc_at = hostport(settings.host, grpc_port)
    log.info(
        "%s%s metrics http://%s/metrics; loading models from %s",
        LISTENING_PREFIX, grpc_at, hostport(settings.host, metrics_port), settings.model_repository,
    )  # fmt: skip

    stop = asyncio.Event()
    _on_signals(stop)
    starting = asyncio.create_task(manager.start(on_change=health.refresh), name="load models")
    stopping = asyncio.create_task(stop.wait(), name="wait for a signal")
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if starting.done():
        if starting.exception() is not None:
            log.error("loading the models failed", exc_info=starting.exception())
            stop.set()
            status = 1
        else:
            await health.refresh()
            _report(manager, state, grpc_at)
    await stopping

    began, grace = time.monotonic(), settings.grace_period_s

    def left() -> float:
        """What is left of the grace period: each step of the stop waits at most that."""
        return max(grace - (time.monotonic() - began), MIN_STOP_STEP_S)

    log.info("stopping: refusing new requests, finishing those accepted (up to %gs)", grace)
    state.draining = True
    await health.drain()
    # close() first when models are still loading: it tells the load thread to give up at its
    # next step; the RPCs in flight are answered by the batchers it lets finish.
    closing = None if starting.done() else asyncio.ensure_future(manager.close())
    # gRPC cancels (CANCELLED, which clients do not retry) the calls that reached it but not
    # yet a handler when the server stops; for a moment first, new calls are still taken and
    # refused with UNAVAILABLE, so callers under load learn to go elsewhere.
    await asyncio.sleep(min(REFUSE_BEFORE_STOP_S, grace / 4))
    await server.stop(left())
    if closing is None:
        closing = asyncio.ensure_future(manager.close())
    try:
        await asyncio.wait_for(asyncio.gather(closing, _finish(starting)), timeout=left())
    except TimeoutError:  # builtin TimeoutError only from Python 3.11
        log.warning("models did not close within the grace period; exiting anyway")
    log.info("stopped after %.2fs", time.monotonic() - began)
    return status


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


def _report(manager: ModelManager, state: ApiState, grpc_at: str) -> None:
    """One line per model, then whether the server is ready and how to call it."""
    served = {(m.name, str(m.version)): m for m in manager.served()}
    index = manager.index()
    for model in index:
        one = served.get((model.name, model.version))
        if one is not None:
            c, h, w = one.input_shape
            log.log(
                logging.WARNING if one.synthetic else logging.INFO,
                "model %s version %s: READY (%s on %s, input [N,%d,%d,%d], %d classes%s)",
                model.name, model.version, one.platform, one.device, c, h, w, one.num_classes,
                f"; {SYNTHETIC_WARNING}" if one.synthetic else "",
            )  # fmt: skip
        else:
            version = f" version {model.version}" if model.version else ""
            log.warning("model %s%s: %s: %s", model.name, version, model.state, model.reason)
    dial = _dial_address(grpc_at)
    example = min(served) if served else ("MODEL", "")
    log.info(
        "%s: %d model version(s) serving, %s; call it with the native API "
        "(%s -m client classify --server %s --model %s IMAGE.png) or the KServe v2 "
        "protocol (tritonclient.grpc.InferenceServerClient(%r))",
        STARTED, len(served), "ready" if state.ready else "NOT ready (see the models above)",
        _python(), dial, example[0], dial,
    )  # fmt: skip


def _python() -> str:
    """The interpreter to show in the hint: the project's venv as a path the user can type."""
    relative = os.path.relpath(sys.executable)
    return "python" if relative.startswith("..") else relative


def _dial_address(bound: str) -> str:
    """A wildcard bind address is not one a client can dial: show localhost instead."""
    host, _, port = bound.rpartition(":")
    return f"localhost:{port}" if host in ("0.0.0.0", "[::]", "") else bound
