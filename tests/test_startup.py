"""Start-up and shutdown around model loading, on real server processes.

The listening line scripts read the ports from; one unreadable config.pbtxt costs only its
model; health answers for each model while models load; SIGTERM during a long load exits
within the grace period, and a second signal exits at once.
"""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from generated_models import SHAPE, write_slow_model
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_process import ServerProcess, copy_repository, set_batching

from modelrepo.layout import CONFIG_FILE, INPUT_NAME
from server.startlines import (
    LISTENING_PREFIX,
    STARTED,
    hostport,
    listening_line,
    parse_listening,
    parse_rest_port,
)
from wire import grpc_service_pb2 as pb

pytestmark = pytest.mark.both_transports
KSERVE = "/inference.GRPCInferenceService"
# A load of about 200 x 0.1 s on an idle 2-core box: far longer than the grace period.
SLOW_INSTANCES = 200
GRACE_S = 3.0
# Exit after SIGTERM: drain (nothing in flight), the load step in progress, process exit.
# Generous for a loaded 2-core box; finishing the load instead would take well over this.
EXIT_BOUND_S = GRACE_S + 6.0


def health(channel: grpc.Channel, service: str) -> str:
    """The health status name of `service`, or "NOT_FOUND" when the server knows no such one."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return "NOT_FOUND"
        raise
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def infer_request(model: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=[1, *SHAPE])
    request.raw_input_contents.append(np.full((1, *SHAPE), 0.5, np.float32).tobytes())
    return request


def kserve(channel: grpc.Channel, method: str, response: type) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        f"{KSERVE}/{method}",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response.FromString,
    )


# -- the listening line ----------------------------------------------------------------------


def test_listening_line_parser_reads_text_and_json_lines() -> None:
    text = (
        "2026-01-01 12:00:00,000 INFO    server: serving on grpc 127.0.0.1:50051 metrics "
        "http://127.0.0.1:8002/metrics; loading models from /srv/models"
    )
    assert parse_listening(text) == ("127.0.0.1", 50051, 8002)
    as_json = (
        '{"level": "info", "message": "serving on grpc [::]:7001 metrics http://[::]:7002/metrics;'
        ' loading models from /srv/models"}'
    )
    assert parse_listening(as_json) == ("::", 7001, 7002)
    assert hostport("::", 7001) == "[::]:7001"
    assert parse_listening(f"{LISTENING_PREFIX}localhost:1 metrics http://localhost:2/metrics") == (
        "localhost",
        1,
        2,
    )
    for other in (
        "startup complete: 1 model version(s) serving",
        "serving on grpc 127.0.0.1:notaport metrics http://127.0.0.1:1/metrics",
        "",
    ):
        assert parse_listening(other) is None
        assert parse_rest_port(other) is None


def test_listening_line_names_the_http_port_or_says_it_is_off() -> None:
    line = listening_line("127.0.0.1:1", "127.0.0.1:2", "https://127.0.0.1:3")
    assert parse_listening(line) == ("127.0.0.1", 1, 2) and parse_rest_port(line) == 3
    off = listening_line("[::]:1", "[::]:2", "") + "; loading models from /srv/models"
    assert parse_listening(off) == ("::", 1, 2) and parse_rest_port(off) == 0
    v6 = listening_line("[::1]:1", "[::1]:2", "http://[::1]:8000") + "; 2 workers loading"
    assert parse_rest_port(v6) == 8000


# -- a bad config costs only its model -------------------------------------------------------


def test_non_utf8_config_makes_only_that_model_unavailable(
    model_repository: Path, tmp_path: Path
) -> None:
    repo = copy_repository(model_repository, tmp_path / "repository", ["fashion_mnist", "cifar10"])
    text = 'name: "cifar10"\n# entra\u00eene sur CIFAR-10\n'
    (repo / "cifar10" / CONFIG_FILE).write_bytes(text.encode("latin-1"))
    expected = "bad config: cifar10/config.pbtxt: not UTF-8 text (byte 0xee at offset 23)"

    with ServerProcess(repo) as server:
        listening = parse_listening(server.log)
        assert listening is not None and listening[1:] == (server.grpc_port, server.metrics_port)
        with grpc.insecure_channel(hostport("127.0.0.1", server.grpc_port)) as channel:
            index = kserve(channel, "RepositoryIndex", pb.RepositoryIndexResponse)(
                pb.RepositoryIndexRequest(), timeout=10
            )
            states = {m.name: (m.state, m.reason) for m in index.models}
            assert states == {"cifar10": ("UNAVAILABLE", expected), "fashion_mnist": ("READY", "")}
            answer = kserve(channel, "ModelInfer", pb.ModelInferResponse)(
                infer_request("fashion_mnist"), timeout=30
            )
            scores = np.frombuffer(answer.raw_output_contents[0], np.float32)
            assert scores.shape == (10,) and abs(float(scores.sum()) - 1.0) < 1e-4
            assert health(channel, "fashion_mnist") == "SERVING"
            assert health(channel, "cifar10") == "NOT_SERVING"
            assert health(channel, "") == "NOT_SERVING"  # not every model is ready
            assert health(channel, "liveness") == "SERVING"  # no restart would fix cifar10
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as page:
            metrics = page.read().decode()
        assert "imgserve_model_ready" in metrics
        assert "_created" not in metrics  # switched off by the serving process
        assert server.process is not None and server.process.poll() is None
        log = server.log
    assert f"model cifar10: UNAVAILABLE: {expected}" in log
    assert str(repo) not in expected
    # The fixture models learned from generated images: said at load and in the report.
    assert "model fashion_mnist was trained on SYNTHETIC data" in log
    ready = next(
        line for line in log.splitlines() if "model fashion_mnist version 1: READY" in line
    )
    assert "WARNING" in ready and "trained on SYNTHETIC data" in ready
    assert "Traceback" not in log


# -- signals while loading -------------------------------------------------------------------


def test_sigterm_during_a_slow_load_exits_within_the_grace_period(
    model_repository: Path, tmp_path: Path
) -> None:
    repo = copy_repository(model_repository, tmp_path / "repository", ["fashion_mnist"])
    write_slow_model(repo, "slow", SLOW_INSTANCES)  # loaded after fashion_mnist (sorted)

    with ServerProcess(repo, grace_period_s=GRACE_S, until_started=False) as server:
        with grpc.insecure_channel(server.target) as channel:
            # Health knows every model from the start, and each as soon as it is ready.
            for _ in range(600):  # bounded: 60 s
                if health(channel, "fashion_mnist") == "SERVING":
                    break
                assert health(channel, "slow") == "NOT_SERVING"
                time.sleep(0.1)
            assert health(channel, "fashion_mnist") == "SERVING", server.log
            assert health(channel, "slow") == "NOT_SERVING"
            assert health(channel, "") == "NOT_SERVING"
            assert health(channel, "liveness") == "SERVING"  # alive while it loads
        assert STARTED not in server.log, "the slow model loaded too fast to test anything"
        status, took = server.exit_after(signal.SIGTERM, EXIT_BOUND_S + 60)
        log = server.log
    assert status == 0, log
    assert took < EXIT_BOUND_S, (took, log)
    assert "SIGTERM received" in log
    assert "model slow version 1: load abandoned (shutting down)" in log
    assert "model slow version 1 ready" not in log
    assert "stopped after" in log and "Traceback" not in log


def test_second_signal_exits_at_once(model_repository: Path, tmp_path: Path) -> None:
    repo = copy_repository(model_repository, tmp_path / "repository", ["fashion_mnist"])
    # A request waits 60 s for its batch: the graceful stop would wait for it.
    set_batching(repo / "fashion_mnist", max_queue_delay_us=60_000_000)

    with ServerProcess(repo, grace_period_s=60.0) as server:
        with grpc.insecure_channel(server.target) as channel:
            waiting = kserve(channel, "ModelInfer", pb.ModelInferResponse).future(
                infer_request("fashion_mnist"), timeout=90
            )
            url = server.metrics_url
            for _ in range(200):  # bounded: 20 s, until the request is queued
                with urllib.request.urlopen(url, timeout=10) as page:
                    if 'imgserve_queue_depth{model="fashion_mnist",version="1"} 1.0' in (
                        page.read().decode()
                    ):
                        break
                time.sleep(0.1)
            else:
                pytest.fail(f"the request never reached the queue:\n{server.log}")
            server.send_signal(signal.SIGTERM)
            server.wait_for(re.compile("stopping: refusing new requests"), 20)
            time.sleep(0.5)
            assert server.process is not None
            assert server.process.poll() is None  # still finishing the accepted request
            status, took = server.exit_after(signal.SIGTERM, 20)
            waiting.cancel()
        log = server.log
    assert status == 128 + signal.SIGTERM, log
    assert took < 5.0, (took, log)
    assert "SIGTERM received again: exiting now" in log
