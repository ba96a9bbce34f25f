"""Several worker processes on the same ports (--workers N), one server from the outside.

Real supervisors and workers, real clients on many channels (each its own connection, so the
kernel spreads them over the workers); every answer names its worker in the trailing metadata
`x-imgserve-worker`, which is how these tests know that every worker was reached.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_process import ServerProcess, copy_repository, kserve_method, set_batching

from modelrepo.layout import REFERENCE_FILE
from server.api.status import WORKER_KEY
from wire import grpc_service_pb2 as pb

pytestmark = pytest.mark.both_transports
WORKERS = 2
MODEL = "fashion_mnist"
# Channels opened to find every worker: all landing on one of two workers has odds 2**-23.
CHANNELS = 24
WORKER_LINE = re.compile(r"worker (\d+) \(pid (\d+)\) (started|restarted)")


def _channel(target: str) -> grpc.Channel:
    """A channel with its own connection (channels to one target otherwise share one)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _reference(repository: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(repository / MODEL / "1" / REFERENCE_FILE) as data:
        return data["inputs"].astype(np.float32), data["outputs"]


def _request(images: np.ndarray, model: str = MODEL) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    return request


def _infer(
    channel: grpc.Channel, images: np.ndarray, timeout: float = 30
) -> tuple[int, str, np.ndarray]:
    """(worker index, model version, probabilities) of one ModelInfer call."""
    response, call = kserve_method(channel, "ModelInfer").with_call(
        _request(images), timeout=timeout
    )
    worker = int(dict(call.trailing_metadata())[WORKER_KEY])
    shape = tuple(response.outputs[0].shape)
    probabilities = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(shape)
    return worker, response.model_version, probabilities


def _worker_pids(server: ServerProcess) -> dict[int, int]:
    """Worker index -> pid of its latest process, from the workers' own start-up lines."""
    return {int(index): int(pid) for index, pid, _ in WORKER_LINE.findall(server.log)}


def _channels_by_worker(target: str) -> Iterator[tuple[int, grpc.Channel]]:
    """(worker, channel) for CHANNELS new channels; the caller closes them."""
    probe = np.zeros((1, 1, 28, 28), np.float32)
    for _ in range(CHANNELS):
        channel = _channel(target)
        yield _infer(channel, probe)[0], channel


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve("--workers", str(WORKERS), models=[MODEL, "cifar10"])


def test_every_worker_answers_with_the_reference_outputs(server: ServerProcess) -> None:
    inputs, outputs = _reference(server.repository)
    seen: dict[int, int] = {}
    for _ in range(CHANNELS):
        with _channel(server.target) as channel:
            worker, version, probabilities = _infer(channel, inputs)
        np.testing.assert_allclose(probabilities, outputs, atol=1e-5)
        assert version == "1"
        seen[worker] = seen.get(worker, 0) + 1
    assert sorted(seen) == list(range(WORKERS)), f"answers by worker: {seen}"
    pids = _worker_pids(server)
    assert len(set(pids.values())) == WORKERS and server.process.pid not in pids.values()


def test_statistics_and_metrics_count_every_worker(server: ServerProcess) -> None:
    client = triton.InferenceServerClient(server.target)
    before = client.get_inference_statistics("cifar10").model_stats[0]
    requests_before = server.metric("imgserve_requests_total", model="cifar10", code="OK")
    images = np.random.default_rng(1).random((2, 3, 32, 32), np.float32)
    workers: set[int] = set()
    sent = 0
    for _ in range(CHANNELS):
        with _channel(server.target) as channel:
            for _ in range(3):
                response, call = kserve_method(channel, "ModelInfer").with_call(
                    _request(images, "cifar10"), timeout=30
                )
                assert response.model_name == "cifar10"
                workers.add(int(dict(call.trailing_metadata())[WORKER_KEY]))
                sent += 1
    assert len(workers) == WORKERS
    # Asked through several channels (so of several workers), the sums are the same.
    for _ in range(4):
        with _channel(server.target) as channel:
            stats = pb.ModelStatisticsResponse.FromString(
                kserve_method(channel, "ModelStatistics")(
                    pb.ModelStatisticsRequest(name="cifar10"), timeout=10
                ).SerializeToString()
            ).model_stats[0]
        success = stats.inference_stats.success.count - before.inference_stats.success.count
        assert success == sent
        assert stats.inference_count - before.inference_count == 2 * sent
        assert stats.inference_stats.queue.count - before.inference_stats.queue.count == sent
    requests = server.metric("imgserve_requests_total", model="cifar10", code="OK")
    assert requests - requests_before == sent
    assert server.metric("imgserve_workers") == WORKERS
    client.close()


def test_server_wide_answers_are_the_same_on_every_worker(server: ServerProcess) -> None:
    answers: dict[int, tuple[bytes, bool, bool, int]] = {}
    for worker, channel in _channels_by_worker(server.target):
        with channel:
            index = kserve_method(channel, "RepositoryIndex")(pb.RepositoryIndexRequest())
            ready = kserve_method(channel, "ServerReady")(pb.ServerReadyRequest()).ready
            model = kserve_method(channel, "ModelReady")(pb.ModelReadyRequest(name=MODEL)).ready
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            answers[worker] = (index.SerializeToString(), ready, model, health.status)
    assert sorted(answers) == list(range(WORKERS))
    assert len(set(answers.values())) == 1, answers
    _, ready, model_ready, health = answers[0]
    assert ready and model_ready and health == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def controlled(serve: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[ServerProcess]:
    server = serve("--workers", str(WORKERS), "--enable-model-control", models=[MODEL])
    yield server
    server.stop()


def test_unload_and_load_reach_every_worker(controlled: ServerProcess) -> None:
    client = triton.InferenceServerClient(controlled.target)
    client.unload_model(MODEL)
    for worker, channel in _channels_by_worker_after_unload(controlled.target):
        with channel:
            assert not kserve_method(channel, "ModelReady")(pb.ModelReadyRequest(name=MODEL)).ready
            with pytest.raises(grpc.RpcError) as caught:
                _infer(channel, np.zeros((1, 1, 28, 28), np.float32))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, worker
    with pytest.raises(triton.InferenceServerException, match="not loaded"):
        client.unload_model(MODEL)  # already unloaded on every worker
    client.load_model(MODEL)
    workers = set()
    for worker, channel in _channels_by_worker(controlled.target):  # inference works again
        workers.add(worker)
        channel.close()
    assert workers == set(range(WORKERS))
    client.close()


def _channels_by_worker_after_unload(target: str) -> Iterator[tuple[int, grpc.Channel]]:
    """(worker, channel) found with ServerLive's trailing metadata: inference is refused."""
    for _ in range(CHANNELS):
        channel = _channel(target)
        _, call = kserve_method(channel, "ServerLive").with_call(pb.ServerLiveRequest())
        yield int(dict(call.trailing_metadata())[WORKER_KEY]), channel


def test_hot_reload_under_load_fails_no_request(controlled: ServerProcess) -> None:
    """A new version appears and is loaded while clients on every worker keep calling."""
    source = controlled.repository / MODEL
    shutil.copytree(source / "1", source / "2")
    images = np.random.default_rng(2).random((1, 1, 28, 28), np.float32)
    stop = threading.Event()
    versions: list[str] = []
    errors: list[grpc.RpcError] = []

    def call_until_stopped() -> None:
        with _channel(controlled.target) as channel:
            while not stop.is_set():
                try:
                    versions.append(_infer(channel, images)[1])
                except grpc.RpcError as exc:
                    errors.append(exc)

    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(call_until_stopped)
        time.sleep(1.0)
        client = triton.InferenceServerClient(controlled.target)
        client.load_model(MODEL)
        time.sleep(1.0)
        stop.set()
    assert not errors, [e.details() for e in errors[:3]]
    assert "1" in versions and versions[-1] == "2"
    with _channel(controlled.target) as channel:
        stats = kserve_method(channel, "RepositoryIndex")(pb.RepositoryIndexRequest(ready=True))
    assert {(m.name, m.version) for m in stats.models} == {(MODEL, "2")}  # latest only
    for worker, channel in _channels_by_worker(controlled.target):
        with channel:
            assert _infer(channel, images)[1] == "2", f"worker {worker} serves the old version"
    client.close()


def test_a_load_that_fails_leaves_every_worker_as_it_was(controlled: ServerProcess) -> None:
    (controlled.repository / MODEL / "config.pbtxt").write_text("max_batch_size: [oops\n")
    client = triton.InferenceServerClient(controlled.target)
    with pytest.raises(triton.InferenceServerException) as caught:
        client.load_model(MODEL)
    assert "config.pbtxt" in str(caught.value)
    for worker, channel in _channels_by_worker(controlled.target):
        with channel:
            assert _infer(channel, np.zeros((1, 1, 28, 28), np.float32))[1] == "1", worker
    assert client.is_server_ready()
    client.close()


def test_a_killed_worker_fails_only_its_own_calls_and_comes_back(
    serve: Callable[..., ServerProcess],
) -> None:
    def slow(repository: Path) -> None:  # requests wait 0.5 s: the kill finds some in flight
        set_batching(repository / MODEL, max_queue_delay_us=500_000, max_batch_size=64)

    server = serve("--workers", str(WORKERS), models=[MODEL], prepare=slow)
    images = np.zeros((1, 1, 28, 28), np.float32)
    by_worker: dict[int, list[grpc.Channel]] = {}
    for worker, channel in _channels_by_worker(server.target):
        by_worker.setdefault(worker, []).append(channel)
    assert sorted(by_worker) == list(range(WORKERS))
    victim = 1
    pid = _worker_pids(server)[victim]
    calls = {
        (worker, n): kserve_method(channel, "ModelInfer").future(_request(images), timeout=30)
        for worker, channels in by_worker.items()
        for n, channel in enumerate(channels)
    }
    time.sleep(0.2)  # queued, waiting for their batch
    os.kill(pid, signal.SIGKILL)
    for (worker, _), call in calls.items():
        if worker == victim:
            with pytest.raises(grpc.RpcError) as caught:
                call.result()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        else:
            assert call.result().model_name == MODEL
    # Meanwhile the others serve, and the server stays ready: the dead worker has no socket.
    with _channel(server.target) as channel:
        assert kserve_method(channel, "ServerReady")(pb.ServerReadyRequest()).ready, server.log
    server.wait_for(re.compile(rf"worker {victim} is serving again"), timeout=60)
    assert f"worker {victim} died (SIGKILL)" in server.log
    assert _worker_pids(server)[victim] != pid
    assert server.metric("imgserve_worker_restarts_total") == 1
    assert server.metric("imgserve_workers") == WORKERS
    workers = set()
    for worker, channel in _channels_by_worker(server.target):
        workers.add(worker)
        channel.close()
    assert workers == set(range(WORKERS))
    for channels in by_worker.values():
        for channel in channels:
            channel.close()


def test_sigterm_drains_every_worker(serve: Callable[..., ServerProcess]) -> None:
    def slow(repository: Path) -> None:
        set_batching(repository / MODEL, max_queue_delay_us=1_000_000, max_batch_size=256)

    server = serve("--workers", str(WORKERS), models=[MODEL], prepare=slow, grace_period_s=5)
    images = np.zeros((1, 1, 28, 28), np.float32)
    channels = list(_channels_by_worker(server.target))
    assert {worker for worker, _ in channels} == set(range(WORKERS))
    calls = [
        kserve_method(channel, "ModelInfer").future(_request(images), timeout=30)
        for _, channel in channels
    ]
    time.sleep(0.3)
    status, took = server.exit_after(signal.SIGTERM, timeout=20)
    assert status == 0
    assert took < 5 + 2
    assert all(call.result().model_name == MODEL for call in calls)
    assert server.log.count("stopped after") == WORKERS
    for _, channel in channels:
        channel.close()


def test_a_worker_that_cannot_start_stops_the_server(
    model_repository: Path, tmp_path: Path
) -> None:
    repository = copy_repository(model_repository, tmp_path / "repository", [MODEL])
    server = ServerProcess(
        repository, "--workers", "2", "--tls-cert", str(tmp_path / "missing.pem"),
        "--tls-key", str(tmp_path / "missing.key"), "--grpc-transport", "auto",
        until_started=False,
    )  # fmt: skip
    with pytest.raises(AssertionError, match="exited"):
        server.start(timeout=60)
    assert server.process.returncode == 1
    assert "cannot start: cannot read --tls-cert" in server.log
    assert "exited during the first start" in server.log


def test_one_worker_runs_no_supervisor(serve: Callable[..., ServerProcess]) -> None:
    server = serve("--workers", "1", models=[MODEL])
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    assert children.read_text().split() == []
    with _channel(server.target) as channel:
        _, call = kserve_method(channel, "ServerLive").with_call(pb.ServerLiveRequest())
    assert WORKER_KEY not in dict(call.trailing_metadata())
