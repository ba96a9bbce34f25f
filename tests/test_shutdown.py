"""Process lifecycle: draining on SIGTERM/SIGINT, and start-up failures that exit cleanly."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_process import (
    PROJECT_ROOT,
    ServerProcess,
    classifier_method,
    copy_repository,
    kserve_method,
    onnx_probabilities,
    set_batching,
)

from wire import classifier_pb2
from wire import grpc_service_pb2 as pb

pytestmark = pytest.mark.both_transports
SHAPE = (1, 28, 28)
GRACE_S = 5.0
# What the server's own timing of its stop may exceed the grace period by: scheduling.
STOP_SLACK_S = 0.5
WAVE = 100
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
# The server's own account of its shutdown, from the signal to the last model closed.
STOPPED = re.compile(r"stopped after (\d+(?:\.\d+)?)s")


@pytest.fixture(scope="module")
def repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = copy_repository(
        model_repository, tmp_path_factory.mktemp("shutdown") / "repository", ["fashion_mnist"]
    )
    # Requests wait up to 1 s in the queue: a signal is sure to find some in flight.
    set_batching(repo / "fashion_mnist", max_queue_delay_us=1_000_000, max_batch_size=256)
    return repo


def _request(images: np.ndarray, index: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="fashion_mnist", id=str(index))
    request.inputs.add(name="input", datatype="FP32", shape=[1, *SHAPE])
    request.raw_input_contents.append(images[index : index + 1].tobytes())
    return request


async def _drain_scenario(server: ServerProcess, images: np.ndarray) -> dict[str, object]:
    """Fire a wave, wait until the server holds all of it, signal, fire a second wave."""
    async with grpc.aio.insecure_channel(server.target) as channel:
        infer = kserve_method(channel, "ModelInfer")

        async def call(index: int) -> object:
            try:
                return await infer(_request(images, index), timeout=20)
            except grpc.aio.AioRpcError as exc:
                return exc.code()

        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=20
        )
        stream = channel.stream_stream(
            STREAM,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )(timeout=20)
        statuses = [(await watch.read()).status]

        first = [asyncio.create_task(call(i)) for i in range(WAVE)]
        held = time.monotonic() + 10
        while True:  # until the whole wave has reached the server
            samples = await asyncio.to_thread(server.metrics)  # one scrape: a consistent view
            in_flight = sum(v for (n, _), v in samples.items() if n == "imgserve_inflight_requests")
            answered = sum(v for (n, _), v in samples.items() if n == "imgserve_requests_total")
            if in_flight + answered >= WAVE:
                break
            assert time.monotonic() < held, "the first wave never reached the server"
            await asyncio.sleep(0.02)

        server.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        statuses.append((await watch.read()).status)  # the drain is announced to watchers
        watch.cancel()
        await stream.write(_request(images, 0))  # an open stream's next request is refused
        refused_on_stream = await stream.read()
        await stream.done_writing()
        second = [asyncio.create_task(call(WAVE + i)) for i in range(WAVE)]
        _, pending = await asyncio.wait([*first, *second], timeout=30)
        assert not pending, f"{len(pending)} requests hang"
    return {
        "first": [t.result() for t in first],
        "second": [t.result() for t in second],
        "statuses": statuses,
        "stream": refused_on_stream,
        "signalled": signalled,
        "in_flight": in_flight,
    }


def test_sigterm_finishes_accepted_requests_and_exits_zero(repository: Path) -> None:
    images = np.random.default_rng(0).random((2 * WAVE, *SHAPE), dtype=np.float32)
    expected = onnx_probabilities(repository / "fashion_mnist" / "1" / "model.onnx", images)
    server = ServerProcess(repository, grace_period_s=GRACE_S).start()
    try:
        outcome = asyncio.run(_drain_scenario(server, images))
        status = server.wait(GRACE_S + 10)
        exited_after = time.monotonic() - outcome["signalled"]
    finally:
        server.kill()

    assert outcome["in_flight"] > 0  # the 1 s window holds the wave: normally all of it
    for index, answer in enumerate(outcome["first"]):  # accepted before the signal: answered
        assert isinstance(answer, pb.ModelInferResponse), (index, answer)
        row = np.frombuffer(answer.raw_output_contents[0], np.float32)
        np.testing.assert_allclose(row, expected[index], rtol=0, atol=1e-6)
    for answer in outcome["second"]:  # after it: answered or refused, never lost
        assert isinstance(answer, pb.ModelInferResponse) or answer == grpc.StatusCode.UNAVAILABLE
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert outcome["statuses"] == [serving, not_serving]
    assert "shutting down" in outcome["stream"].error_message
    assert status == 0, server.log
    # Timed by the server itself, so a slow, loaded machine late to see the exit does not
    # fail it: the whole stop fits in the grace period, give or take scheduling.
    assert _stopped_after(server) < GRACE_S + STOP_SLACK_S
    assert exited_after < GRACE_S + 10  # and the process ends once it has stopped
    assert "SIGTERM received" in server.log


def _stopped_after(server: ServerProcess) -> float:
    """Seconds the server logged its shutdown took (it logs that last)."""
    return float(server.wait_for(STOPPED, timeout=1)[1])


def test_sigint_on_an_idle_server_exits_zero_quickly_json_logs(repository: Path) -> None:
    server = ServerProcess(repository, "--log-format", "json", grace_period_s=GRACE_S).start()
    try:
        server.send_signal(signal.SIGINT)
        assert server.wait(GRACE_S + 10) == 0, server.log
    finally:
        server.kill()
    # Nothing in flight: it stops without waiting out the grace period.
    assert _stopped_after(server) < GRACE_S / 2
    entries = [json.loads(line) for line in server.log.splitlines()]  # one object per line
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    messages = [entry["message"] for entry in entries]
    assert any(m.startswith("model fashion_mnist version 1: READY") for m in messages)
    assert "SIGINT received" in messages
    assert all(entry["level"] in ("info", "warning") for entry in entries)


def _run_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("what", ["gRPC", "HTTP"])
def test_port_in_use_is_a_clear_error(repository: Path, what: str, workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = {"gRPC": "0", "HTTP": "0", what: port}
        result = _run_server(
            "--model-repository", str(repository), "--host", "127.0.0.1", "--workers", workers,
            "--grpc-port", ports["gRPC"], "--http-port", ports["HTTP"], "--metrics-port", "0",
        )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot listen for {what} on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_repository_is_a_clear_error(tmp_path: Path) -> None:
    result = _run_server(
        "--model-repository", str(tmp_path / "nowhere"),
        "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
    )  # fmt: skip  # ports of its own: a default port another program holds would fail first
    assert result.returncode == 1
    assert "is not a directory" in result.stderr and "build-repository" in result.stderr
    assert "Traceback" not in result.stderr


# --- SIGTERM under sustained load ---

LOAD_CLIENTS = 24


@pytest.fixture(scope="module")
def busy_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fashion_mnist with a 2 ms window: a steady stream of small batches."""
    repo = copy_repository(
        model_repository, tmp_path_factory.mktemp("busy") / "repository", ["fashion_mnist"]
    )
    set_batching(repo / "fashion_mnist", max_queue_delay_us=2000, max_batch_size=32)
    return repo


async def _load_through_signal(server: ServerProcess, images: np.ndarray) -> dict[str, object]:
    """Closed-loop clients on both APIs, before, across and after SIGTERM, until every client
    has been refused; the server is signalled once answers flow."""
    outcomes: list[tuple[int, float, object]] = []  # (row, when it was answered, answer)
    signalled: list[float] = []
    async with grpc.aio.insecure_channel(server.target) as channel:
        infer = kserve_method(channel, "ModelInfer")
        classify = classifier_method(channel, "Classify")

        async def client(worker: int) -> None:
            index = worker
            while True:
                row = index % len(images)
                try:
                    if worker % 2:
                        tensor = classifier_pb2.Tensor(
                            shape=list(SHAPE), datatype="FP32", data=images[row].tobytes()
                        )
                        request = classifier_pb2.ClassifyRequest(
                            model="fashion_mnist", images=[classifier_pb2.Image(tensor=tensor)]
                        )
                        answer: object = await classify(request, timeout=20)
                    else:
                        answer = await infer(_request(images, row), timeout=20)
                except grpc.aio.AioRpcError as exc:
                    outcomes.append((row, time.monotonic(), (exc.code(), exc.details())))
                    return  # refused: the server is going away
                outcomes.append((row, time.monotonic(), answer))
                index += LOAD_CLIENTS

        clients = [asyncio.create_task(client(i)) for i in range(LOAD_CLIENTS)]
        while len(outcomes) < 200:
            await asyncio.sleep(0.01)
        server.send_signal(signal.SIGTERM)
        signalled.append(time.monotonic())
        _, pending = await asyncio.wait(clients, timeout=30)
        assert not pending, f"{len(pending)} clients hang"
    return {"outcomes": outcomes, "signalled": signalled[0]}


def test_sigterm_under_load_answers_every_accepted_request(busy_repository: Path) -> None:
    images = np.random.default_rng(1).random((256, *SHAPE), dtype=np.float32)
    expected = onnx_probabilities(busy_repository / "fashion_mnist" / "1" / "model.onnx", images)
    server = ServerProcess(busy_repository, grace_period_s=GRACE_S).start()
    try:
        result = asyncio.run(_load_through_signal(server, images))
        status = server.wait(GRACE_S + 10)
    finally:
        server.kill()
    assert status == 0, server.log
    assert _stopped_after(server) < GRACE_S + STOP_SLACK_S
    signalled = result["signalled"]
    answered_after = 0
    refusals = []
    for row, answered, outcome in result["outcomes"]:
        if isinstance(outcome, tuple):
            refusals.append(outcome)
            continue
        if isinstance(outcome, classifier_pb2.ClassifyResponse):
            got = np.array(outcome.results[0].probabilities, np.float32)
        else:
            got = np.frombuffer(outcome.raw_output_contents[0], np.float32)
        np.testing.assert_allclose(got, expected[row], rtol=0, atol=1e-6)
        answered_after += answered > signalled
    # Every client ended on a refusal, each one UNAVAILABLE: the server said it is stopping,
    # or no longer took connections. Nothing accepted was cancelled or failed.
    assert len(refusals) == LOAD_CLIENTS
    for code, details in refusals:
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "shutting down" in details or "Connection refused" in details, details
    # Requests in flight at the signal, or accepted in the moment before the refusals began,
    # were answered after it.
    assert answered_after > 0
