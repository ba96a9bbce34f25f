"""Ready means ready for model control too, with several workers.

Workers start together and each dials its peers' control sockets from its first moment, some
before they listen. A channel that failed to connect once made gRPC fail every call fast until
its next reconnect attempt (up to a second later), so for that second a worker found a peer
"starting" and refused model control, although the server had logged "startup complete ...
ready" and answered ServerReady true (server.processes.control). The race is one of timing:
each test starts real multi-worker servers several times on a one-model repository (a quick
load leaves the least time for the backoff to end by itself) and changes the model at the
first moment the server says it is ready, the way a deployment script does.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from generated_models import write_fixed_batch_model
from http_calls import http_post
from server_process import ServerProcess, kserve_method

from server.startlines import STARTED
from wire import grpc_service_pb2 as pb

MODEL = "tiny"
WORKERS = "2"
# Starts per test; each costs about 3 s here. Before the fix about one start in four failed.
STARTS = 5
READY_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small model (no reference check): loading it takes a few milliseconds. Unloading
    and loading leave the folder as it was, so every start shares it."""
    repository = tmp_path_factory.mktemp("one_tiny_model")
    write_fixed_batch_model(repository, MODEL, max_batch_size=1)
    return repository


def _channel(target: str) -> grpc.Channel:
    """A channel with its own connection, so that the kernel may give it to any worker."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _server_ready(server: ServerProcess) -> bool:
    with _channel(server.target) as channel:
        answer = kserve_method(channel, "ServerReady")(pb.ServerReadyRequest(), timeout=10)
    return bool(answer.ready)


def _until_ready(server: ServerProcess) -> None:
    """Poll ServerReady, each time on a new connection, until it says true."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _server_ready(server):
        assert time.monotonic() < deadline, f"never ready:\n{server.log}"
        time.sleep(0.01)


def _unload_and_load_over_grpc(server: ServerProcess) -> None:
    with _channel(server.target) as channel:
        unload = kserve_method(channel, "RepositoryModelUnload")
        unload(pb.RepositoryModelUnloadRequest(model_name=MODEL), timeout=30)
        load = kserve_method(channel, "RepositoryModelLoad")
        load(pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=60)
        ready = kserve_method(channel, "ModelReady")(pb.ModelReadyRequest(name=MODEL), timeout=10)
    assert ready.ready


def _unload_and_load_over_http(server: ServerProcess) -> None:
    for step in ("unload", "load"):
        status, _, body = http_post(server, f"/v2/repository/models/{MODEL}/{step}", {})
        assert status == 200, f"{step}: HTTP {status} {body.decode(errors='replace')}"


def _logged_ready(server: ServerProcess) -> None:
    """start() has returned on the supervisor's start-up line: it must say ready."""
    assert re.search(rf"{re.escape(STARTED)}: .* on {WORKERS} workers, ready;", server.log), (
        server.log
    )


def _start_and_change(
    repository: Path,
    wait: Callable[[ServerProcess], None],
    change: Callable[[ServerProcess], None],
    until_started: bool,
) -> None:
    """STARTS times: start a server, wait as `wait` does, and change its model at once."""
    for start in range(STARTS):
        server = ServerProcess(
            repository, "--workers", WORKERS, "--enable-model-control", until_started=until_started
        )
        server.start()
        try:
            wait(server)
            try:
                change(server)
            except (grpc.RpcError, AssertionError) as exc:
                details = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                pytest.fail(f"start {start + 1}: refused after ready: {details}\n{server.log}")
        finally:
            server.stop()


def test_model_control_works_once_the_supervisor_logs_ready(repository: Path) -> None:
    """The log line scripts wait for ("startup complete ... ready"), then HTTP, as in the
    failure first seen (tests/test_http.py's unload and load)."""
    _start_and_change(
        repository,
        _logged_ready,
        _unload_and_load_over_http,
        until_started=True,
    )


def test_model_control_works_once_server_ready_says_true(repository: Path) -> None:
    """ServerReady polled on new connections (any worker may answer it), then gRPC."""
    _start_and_change(repository, _until_ready, _unload_and_load_over_grpc, until_started=False)
