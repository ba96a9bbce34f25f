"""HTTP/REST with several workers (--workers 2): every worker serves the port the supervisor
reserved, and whichever takes a connection answers for the whole server.

Each answer names its worker in the `x-imgserve-worker` header; a new connection per call lets
the kernel spread calls over the workers' sockets.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from server_process import ServerProcess

from modelrepo.layout import REFERENCE_FILE
from server.api.status import WORKER_KEY

WORKERS = 2
MODEL = "fashion_mnist"
CONNECTIONS = 24  # all landing on one of two workers: odds 2**-23


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve("--workers", str(WORKERS), models=[MODEL])


def _call(server: ServerProcess, method: str, path: str, body: Any = None) -> tuple[int, int, Any]:
    """(status, worker, JSON answer) of one call on a connection of its own."""
    connection = http.client.HTTPConnection(server.host, server.http_port, timeout=30)
    try:
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data)
        answer = connection.getresponse()
        document = json.loads(answer.read() or b"null")
        return answer.status, int(answer.getheader(WORKER_KEY)), document
    finally:
        connection.close()


def test_every_worker_serves_http_with_the_reference_outputs(server: ServerProcess) -> None:
    with np.load(server.repository / MODEL / "1" / REFERENCE_FILE) as data:
        inputs, outputs = data["inputs"].astype(np.float32), data["outputs"]
    body = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": list(inputs.shape),
             "data": inputs.ravel().tolist()}
        ]
    }  # fmt: skip
    workers = set()
    for _ in range(CONNECTIONS):
        status, worker, answer = _call(server, "POST", f"/v2/models/{MODEL}/infer", body)
        assert status == 200
        got = np.array(answer["outputs"][0]["data"], np.float32).reshape(outputs.shape)
        np.testing.assert_allclose(got, outputs, atol=1e-5)
        workers.add(worker)
    assert workers == set(range(WORKERS))


def test_statistics_and_readiness_answer_for_every_worker(server: ServerProcess) -> None:
    grpc = grpcclient.InferenceServerClient(server.target)
    before = grpc.get_inference_statistics(MODEL).model_stats[0]
    image = np.zeros((1, 1, 28, 28), np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                        "data": image.ravel().tolist()}]}  # fmt: skip
    sent = 0
    for _ in range(CONNECTIONS):
        assert _call(server, "POST", f"/v2/models/{MODEL}/infer", body)[0] == 200
        sent += 1
    answers: dict[int, tuple[Any, ...]] = {}
    for _ in range(CONNECTIONS):
        _, worker, stats = _call(server, "GET", f"/v2/models/{MODEL}/stats")
        ready = _call(server, "GET", "/v2/health/ready")[0]
        model_ready = _call(server, "GET", f"/v2/models/{MODEL}/ready")[0]
        [entry] = stats["model_stats"]
        answers[worker] = (entry["inference_stats"]["success"]["count"], ready, model_ready)
        batches = entry["batch_stats"]
        assert sum(b["compute_infer"]["count"] for b in batches) == entry["execution_count"]
        assert (
            sum(b["batch_size"] * b["compute_infer"]["count"] for b in batches)
            == (entry["inference_count"])
        )
    grpc.close()
    assert set(answers) == set(range(WORKERS))
    success = before.inference_stats.success.count + sent
    assert set(answers.values()) == {(success, 200, 200)}  # the same sums from each worker
